"""The synthetic shapes generator: determinism, labels that match the drawn pixels, ranges, COCO output."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("skimage")
from skimage.draw import polygon2mask

from attn_export.shapes.data import (
    CATEGORIES,
    MAX_OBJECTS,
    MIN_VISIBLE,
    OBJECT_SIZE,
    SIZE_RANGE,
    generate,
    render_scene,
    write_coco,
)


def test_same_seed_and_index_give_identical_bytes():
    a_img, a_ann = generate(3, 17)
    b_img, b_ann = generate(3, 17)
    assert a_img.dtype == np.uint8 and a_img.ndim == 3 and a_img.shape[2] == 3
    assert a_img.tobytes() == b_img.tobytes()
    assert json.dumps(a_ann) == json.dumps(b_ann)


def test_different_seed_or_index_differ():
    base, _ = generate(3, 17)
    for other in (generate(4, 17)[0], generate(3, 18)[0]):
        assert base.shape != other.shape or base.tobytes() != other.tobytes()


def test_fixed_size():
    img, _ = generate(0, 1, size=(300, 410))
    assert img.shape == (300, 410, 3)


def _coverage(polygon: np.ndarray, h: int, w: int, s: int = 8) -> np.ndarray:
    """An independent rasterisation of one polygon: the fraction of each pixel it covers, from
    scikit-image's point-in-polygon test at the centres of an s x s grid of sub-pixels (the generator
    draws with Pillow at 4 x 4). Pixel (i, j) covers [j, j + 1) x [i, i + 1)."""
    x0 = max(int(np.floor(polygon[:, 0].min())), 0)
    y0 = max(int(np.floor(polygon[:, 1].min())), 0)
    x1 = min(int(np.ceil(polygon[:, 0].max())), w)
    y1 = min(int(np.ceil(polygon[:, 1].max())), h)
    cov = np.zeros((h, w))
    if x1 <= x0 or y1 <= y0:
        return cov
    sub = polygon2mask(((y1 - y0) * s, (x1 - x0) * s), (polygon[:, ::-1] - [y0, x0]) * s - 0.5)
    cov[y0:y1, x0:x1] = sub.reshape(y1 - y0, s, x1 - x0, s).mean((1, 3))
    return cov


def _visible_masks(scene) -> list[np.ndarray]:
    """What the labels promise: a shape's visible pixels are those it covers at least half of once
    every object drawn after it has covered its share (coverage times the product of one minus the
    later objects' coverages)."""
    h, w = scene.image.shape[:2]
    covs = [_coverage(obj.polygon, h, w) for obj in scene.objects]
    out = []
    for i, obj in enumerate(scene.objects):
        if not obj.is_shape:
            continue
        vis = covs[i].copy()
        for later in covs[i + 1 :]:
            vis *= 1.0 - later
        out.append(vis >= 0.5)
    return out


def test_labels_match_the_drawn_pixels():
    checked = 0
    for index in range(30):
        scene = render_scene(11, index)
        anns = scene.annotations()
        masks = _visible_masks(scene)
        assert len(anns) == len(masks)
        for ann, vis in zip(anns, masks, strict=True):
            ys, xs = np.nonzero(vis)
            assert len(xs), f"image {index}: a labelled shape has no visible pixel"
            ref = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            x, y, bw, bh = ann["bbox"]
            got = np.array([x, y, x + bw, y + bh])
            assert np.abs(got - ref).max() <= 1, f"image {index}: bbox {got} vs visible mask {ref}"
            checked += 1
    assert checked > 100


def test_ranges_classes_and_counts():
    counts, cats, sizes, shapes = [], set(), [], set()
    for index in range(100):
        scene = render_scene(2, index)
        anns = scene.annotations()
        h, w = scene.image.shape[:2]
        assert SIZE_RANGE[0] <= h <= SIZE_RANGE[1] and SIZE_RANGE[0] <= w <= SIZE_RANGE[1]
        shapes.add((h, w))
        assert 1 <= len(anns) <= MAX_OBJECTS
        counts.append(len(anns))
        for obj, ann in zip([o for o in scene.objects if o.is_shape], anns, strict=True):
            assert ann["category_id"] == obj.category_id
            assert ann["iscrowd"] == 0
            cats.add(ann["category_id"])
            assert OBJECT_SIZE[0] <= obj.size <= OBJECT_SIZE[1]
            # the whole shape's box: at most its size across, at least a third of it
            full = np.nonzero(obj.alpha >= 0.5)
            side = max(np.ptp(full[0]) + 1, np.ptp(full[1]) + 1)
            assert obj.size / 3 <= side <= obj.size + 2
            sizes.append(obj.size)
            # at least MIN_VISIBLE of it visible, and the area is the visible pixel count
            assert ann["area"] >= MIN_VISIBLE * len(full[0]) - 1
            assert ann["area"] <= ann["bbox"][2] * ann["bbox"][3]
    assert cats == {c["id"] for c in CATEGORIES}
    assert min(counts) <= 2 and max(counts) >= 10
    assert min(sizes) < 30 and max(sizes) > 140
    assert len(shapes) > 80  # sizes vary, so letterboxing matters


def test_write_coco(tmp_path):
    path = write_coco(tmp_path / "set", seed=1, count=3)
    data = json.loads(path.read_text())
    assert [i["file_name"] for i in data["images"]] == ["000000.png", "000001.png", "000002.png"]
    assert data["categories"] == CATEGORIES
    ids = [a["id"] for a in data["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    assert {a["image_id"] for a in data["annotations"]} <= {1, 2, 3}
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "set" / "images" / "000001.png"))
    assert img.tobytes() == generate(1, 1)[0].tobytes()
