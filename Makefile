# Two entry points, each doing all of its own set-up on a fresh machine:
#   make run    export the shipped shapes detector to ONNX (verified against PyTorch) and serve it on
#               http://127.0.0.1:8000 with onnxruntime on the CPU (Ctrl-C stops it)
#   make test   run the test suite
# Also: make demo (export and verify the demo model of every block), make bench, make weights,
#   make fuzz (the service's fuzzers for FUZZ_SECONDS each, default 60; make test runs them a few seconds each).
# torch==2.13.0 is installed first: it is the local CPU wheel; an unpinned torch would pull CUDA builds.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test demo bench clean serve weights fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	-$(PY) -m pip install -q --no-deps nvidia-pytriton==0.7.0    # tritonserver 2.51, Linux x86-64 only (its numpy < 2 pin would downgrade numpy); without it the tests with the real server skip
	-$(PY) -m pip install -q --target $(VENV)/triton-stub "numpy<2"    # numpy for its Python-backend stub only (wheels up to Python 3.12)
	touch $(STAMP)

run: serve

demo: $(STAMP)
	$(VENV)/bin/attn-export demo --out out

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/attn-export bench

fuzz: $(STAMP)
	FUZZ_SECONDS=$${FUZZ_SECONDS:-60} $(PY) -m pytest -q tests/serve/test_fuzz_parsers.py tests/serve/test_fuzz_http.py tests/serve/test_fuzz_grpc.py tests/serve/test_no_500.py

clean:
	rm -rf $(VENV) out build *.egg-info

# Export the shipped shapes detector (verified), write three sample images to out/samples/images/
# for curl, and serve the graph on http://127.0.0.1:8000 (Ctrl-C stops it).
# --dynamic-hw: free height and width, so the service letterboxes each image to the smallest rectangle of
# whole strides (rect inference). On the 500 evaluation images its mAP is within 0.005 of the square's
# (0.9020 vs 0.9013 mAP@0.5, 0.7317 vs 0.7310 mAP@0.5:0.95: attn-export evaluate out/shapes_detector.onnx
# --backend onnxruntime --rect-vs-square), and 16:9 photos run 1.5-1.8x faster (docs/serving.md).
serve: $(STAMP)
	mkdir -p out
	$(VENV)/bin/attn-export models/shapes_detector.pt -o out/shapes_detector.onnx --batch 1:4:16 --dynamic-hw 64:320:320
	$(VENV)/bin/attn-export data --out out/samples --count 3 --seed 7
	$(VENV)/bin/attn-export serve out/shapes_detector.onnx

# Retrain models/shapes_detector.pt from its seeds: five CPU runs, 27 epochs, about 2 h 45 min on 2 cores.
# The stages land in out/train/; the last is the shipped checkpoint's recipe (its meta's `history` and
# `command` record the same runs), evaluated at the end on the 500 images the README reports.
TRAIN := $(VENV)/bin/attn-export train
FINE := --epochs 3 --lr 3e-4 --warmup 100 --final-epochs 1
weights: $(STAMP)
	mkdir -p out/train
	$(TRAIN) --seed 0 --epochs 14 --out out/train/stage1.pt
	$(TRAIN) --seed 0 --init out/train/stage1.pt --epochs 4 --lr 5e-4 --warmup 100 --final-epochs 1 --out out/train/stage2.pt
	$(TRAIN) --seed 1 --init out/train/stage2.pt $(FINE) --out out/train/stage3.pt
	$(TRAIN) --seed 2 --init out/train/stage3.pt $(FINE) --out out/train/stage4.pt
	$(TRAIN) --seed 3 --init out/train/stage4.pt $(FINE) --out out/train/shapes_detector.pt
	$(VENV)/bin/attn-export evaluate out/train/shapes_detector.pt --compare
