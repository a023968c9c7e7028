#!/bin/sh
# The images' install step, shared by docker/Dockerfile.cpu and docker/Dockerfile.gpu, and run as is by the
# recipe test (tests/serve/test_serve_docker.py) in a fresh virtual environment.
#
#   sh docker/install.sh SOURCE_DIR [EXTRAS]
#
# torch is installed first and pinned (2.13.0): an unpinned torch, pulled in by the package's "torch>=2.6",
# would take the newest release. TORCH_INDEX_URL picks its build: the CPU image sets PyTorch's CPU index (no
# CUDA libraries); unset, pip's configured index decides (PyPI: the CUDA build, for the GPU image).
# ONNXRUNTIME_GPU=VERSION swaps onnxruntime for onnxruntime-gpu (both install the same module).
# The Dockerfiles set PIP_NO_CACHE_DIR=1; the recipe test leaves it unset to reuse its wheel cache.
set -eu

src="${1:?usage: install.sh SOURCE_DIR [EXTRAS]}"
extras="${2:-serve}"
torch_version="${TORCH_VERSION:-2.13.0}"

if [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install "torch==${torch_version}" --index-url "${TORCH_INDEX_URL}"
else
    python -m pip install "torch==${torch_version}"
fi
python -m pip install "${src}[${extras}]"
if [ -n "${ONNXRUNTIME_GPU:-}" ]; then
    python -m pip uninstall -y onnxruntime
    python -m pip install --force-reinstall --no-deps "onnxruntime-gpu==${ONNXRUNTIME_GPU}"
fi
python -m pip check
