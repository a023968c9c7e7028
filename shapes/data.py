"""Synthetic shapes detection: circles, triangles, rectangles and stars on mixed backgrounds.

``generate(seed, index)`` draws one image and its COCO-style labels, the same bytes for the same
``(seed, index)`` on every machine (a numpy ``Generator`` seeded from both; no global state).

What an image holds:

- a size of 256 to 480 px per side (each side drawn on its own), unless ``size`` is given;
- a background that mixes coloured noise, linear/radial gradients, fine textures (stripes, a
  rotated checker, fractal value noise) and crops of the photographs bundled with scikit-image,
  sometimes two of them blended;
- 1 to 12 shapes of four classes (:data:`CLASSES`), each 12 to 160 px across (the diameter of the
  circle through its outermost points), rotated at random, filled with a solid colour, a gradient
  or speckle, chosen to contrast with the background under it most of the time; triangles have
  jittered vertices, rectangles an aspect ratio of 0.35 to 1, stars 5 or 6 points;
- occluders that are not objects: amoeba-like blobs and thick strokes, some placed over shapes;
- sensor noise, sometimes a slight blur.

Objects are drawn in order, each anti-aliased (rasterised on a 4x supersampled patch and averaged),
so later objects hide earlier ones. Each shape's label is the box of its *visible* pixels: its own
coverage times the uncovered part of everything drawn after it, at least one half. An object is
placed only where every shape before it stays at least :data:`MIN_PLACE_VISIBLE` visible (it is
moved up to 20 times, else left out), so every drawn shape is labelled and keeps at least
:data:`MIN_VISIBLE` of its area and :data:`MIN_VISIBLE_PIXELS` pixels.

Labels are COCO ``annotations``: ``bbox`` ``[x, y, w, h]`` in pixels (integer pixel edges),
``category_id`` 1-4 (:data:`CATEGORIES`), ``area`` (visible pixels), ``iscrowd`` 0.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from attn_export.files import atomic_path, write_text

CLASSES = ("circle", "triangle", "rectangle", "star")
CATEGORIES = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]

SIZE_RANGE = (256, 480)  # image side, px
OBJECT_SIZE = (12.0, 160.0)  # diameter of the circumscribed circle, px
MAX_OBJECTS = 12
MIN_VISIBLE = 0.35  # a labelled shape keeps at least this fraction of its pixels visible
MIN_PLACE_VISIBLE = 0.40  # placement keeps every earlier shape at least this visible
MIN_VISIBLE_PIXELS = 20
SUPERSAMPLE = 4

#: Photographs bundled in the scikit-image wheel (no download needed), by loader name. Left out:
#: those whose content looks like a labelled class at the crop scale (coins, cell, clock, moon and
#: colorwheel hold circles, brick holds rectangles, coffee a round cup, retina a disc).
PHOTOS = (
    "astronaut",
    "chelsea",
    "rocket",
    "stereo_motorcycle",
    "immunohistochemistry",
    "hubble_deep_field",
    "camera",
    "page",
    "text",
    "grass",
    "gravel",
)


@dataclass
class Object:
    """One drawn object: a polygon in pixel coordinates (x right, y down, pixel edges at integers)."""

    polygon: np.ndarray  # (V, 2) float64
    category_id: int  # 1..4 for shapes, 0 for occluders
    size: float  # diameter of the circumscribed circle
    alpha: np.ndarray = field(repr=False, default=None)  # coverage on its patch, float32
    origin: tuple[int, int] = (0, 0)  # (x0, y0) of the patch
    visible: np.ndarray = field(repr=False, default=None)  # visible coverage on its patch

    @property
    def is_shape(self) -> bool:
        return self.category_id > 0


@dataclass
class Scene:
    """A generated image with every object drawn on it, in drawing order."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    objects: list[Object]

    def annotations(self) -> list[dict]:
        """COCO annotations of the shapes, in drawing order (no ``id``/``image_id`` yet)."""
        out = []
        for obj in self.objects:
            if not obj.is_shape:
                continue
            ys, xs = np.nonzero(obj.visible >= 0.5)
            x0, y0 = obj.origin
            bx, by = int(xs.min()) + x0, int(ys.min()) + y0
            bw, bh = int(xs.max()) + x0 + 1 - bx, int(ys.max()) + y0 + 1 - by
            out.append(
                {
                    "bbox": [bx, by, bw, bh],
                    "category_id": obj.category_id,
                    "area": len(xs),
                    "iscrowd": 0,
                }
            )
        return out


# ----------------------------------------------------------------------------------------- geometry


def _regular(n: int, radius: float, phase: float) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], 1)


def _rotate(poly: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return poly @ np.array([[c, s], [-s, c]])


def shape_polygon(rng: np.random.Generator, category_id: int, size: float) -> np.ndarray:
    """A shape's outline around the origin, ``size`` across (the circle through its outermost points)."""
    r = size / 2
    angle = rng.uniform(0, 2 * math.pi)
    name = CLASSES[category_id - 1]
    if name == "circle":
        return _regular(max(48, int(size * 1.5)), r, 0.0)
    if name == "triangle":
        t = angle + 2 * math.pi * np.arange(3) / 3 + rng.uniform(-0.25, 0.25, 3)
        return r * np.stack([np.cos(t), np.sin(t)], 1)
    if name == "rectangle":
        aspect = rng.uniform(0.35, 1.0)
        half = math.atan(aspect)  # half-angle between the diagonals
        t = np.array([half, math.pi - half, math.pi + half, -half])
        return _rotate(r * np.stack([np.cos(t), np.sin(t)], 1), angle)
    points = int(rng.integers(5, 7))
    inner = rng.uniform(0.38, 0.55)
    outer = _regular(points, r, angle)
    inner_pts = _regular(points, r * inner, angle + math.pi / points)
    return np.stack([outer, inner_pts], 1).reshape(-1, 2)


def occluder_polygon(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """An amoeba-like blob or a thick stroke (not an object class)."""
    if rng.random() < 0.6:
        size = rng.uniform(14, 90)
        n = 40
        t = 2 * math.pi * np.arange(n) / n
        radius = np.ones(n)
        for k in (2, 3, 4):
            radius += rng.uniform(0.08, 0.22) * np.sin(k * t + rng.uniform(0, 2 * math.pi))
        radius = np.clip(radius, 0.35, None) * size / 2
        return np.stack([radius * np.cos(t), radius * np.sin(t)], 1), size
    length, width = rng.uniform(30, 200), rng.uniform(3, 9)
    poly = np.array(
        [[-length / 2, -width / 2], [length / 2, -width / 2], [length / 2, width / 2], [-length / 2, width / 2]]
    )
    poly = poly + np.stack([np.zeros(4), rng.uniform(-0.15, 0.15) * length * np.array([-1, 1, 1, -1])], 1)
    return _rotate(poly, rng.uniform(0, math.pi)), math.hypot(length, width)


def rasterize(polygon: np.ndarray, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Anti-aliased coverage of ``polygon`` on its bounding patch (clipped to the image).

    Returns ``(alpha float32 (h, w) in [0, 1], (x0, y0))``; pixel ``(i, j)`` of the patch covers
    ``[x0 + j, x0 + j + 1) x [y0 + i, y0 + i + 1)``.
    """
    x0 = max(math.floor(polygon[:, 0].min()), 0)
    y0 = max(math.floor(polygon[:, 1].min()), 0)
    x1 = min(math.ceil(polygon[:, 0].max()), width)
    y1 = min(math.ceil(polygon[:, 1].max()), height)
    w, h = max(x1 - x0, 1), max(y1 - y0, 1)
    s = SUPERSAMPLE
    canvas = Image.new("L", (w * s, h * s), 0)
    # PIL fills the pixels whose centres lie inside; shift by half a (supersampled) pixel to match.
    pts = (polygon - [x0, y0]) * s - 0.5
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts], fill=255)
    alpha = np.asarray(canvas, dtype=np.float32).reshape(h, s, w, s).mean((1, 3)) / 255.0
    return alpha, (x0, y0)


# -------------------------------------------------------------------------------------- backgrounds


@functools.cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, 2)
    return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)


def _resize(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of a float (h, w) or (h, w, c) array."""
    if arr.ndim == 2:
        return np.asarray(Image.fromarray(arr.astype(np.float32), "F").resize((width, height), Image.BICUBIC))
    return np.stack([_resize(arr[:, :, c], height, width) for c in range(arr.shape[2])], 2)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _ramp(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map ``t`` in [0, 1] (h, w) to colours between two random colours."""
    a, b = _colour(rng), _colour(rng)
    return a + t[:, :, None] * (b - a)


def _coords(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))


def _value_noise(rng: np.random.Generator, height: int, width: int, octaves: int, cell: float) -> np.ndarray:
    out = np.zeros((height, width), np.float32)
    amp, total = 1.0, 0.0
    for _ in range(octaves):
        gh, gw = max(2, int(height / cell) + 2), max(2, int(width / cell) + 2)
        out += amp * _resize(rng.random((gh, gw)), height, width)
        total += amp
        amp *= 0.5
        cell = max(cell / 2, 2.0)
    out /= total
    lo, hi = out.min(), out.max()
    return (out - lo) / max(hi - lo, 1e-6)


def background(rng: np.random.Generator, height: int, width: int, kind: str | None = None) -> np.ndarray:
    """A float (H, W, 3) background in [0, 255]: noise, gradient, texture or photo crop."""
    kinds = ("noise", "gradient", "stripes", "checker", "fractal", "photo")
    if kind is None:
        kind = kinds[rng.choice(len(kinds), p=[0.12, 0.16, 0.1, 0.08, 0.14, 0.4])]
    x, y = _coords(height, width)
    if kind == "noise":
        cell = rng.uniform(4, 40)
        low = _resize(rng.uniform(0, 255, (int(height / cell) + 2, int(width / cell) + 2, 3)), height, width)
        return low + rng.normal(0, rng.uniform(5, 30), (height, width, 3))
    if kind == "gradient":
        if rng.random() < 0.6:
            a = rng.uniform(0, 2 * math.pi)
            t = x * math.cos(a) + y * math.sin(a)
        else:
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            t = np.hypot(x - cx, y - cy)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        return _ramp(t, rng)
    if kind == "stripes":
        a, period = rng.uniform(0, math.pi), rng.uniform(4, 20)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(a) + y * math.sin(a)) / period)
        return _ramp(t * rng.uniform(0.3, 1.0), rng)
    if kind == "checker":
        a, cell = rng.uniform(0, math.pi), rng.uniform(3, 10)
        u, v = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
        return _ramp(t * rng.uniform(0.2, 0.6), rng)
    if kind == "fractal":
        t = _value_noise(rng, height, width, int(rng.integers(3, 6)), rng.uniform(16, 96))
        return _ramp(t, rng)
    photo = _photo(PHOTOS[int(rng.integers(len(PHOTOS)))]).astype(np.float32)
    ph, pw = photo.shape[:2]
    scale = max(height / ph, width / pw) * rng.uniform(1.0, 2.5)  # crop at least as large as the output
    ch, cw = min(ph, math.ceil(height / scale)), min(pw, math.ceil(width / scale))
    oy, ox = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    crop = photo[oy : oy + ch, ox : ox + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    out = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((width, height), Image.BILINEAR), np.float32)
    if rng.random() < 0.3:  # tint
        out = out * rng.uniform(0.6, 1.2, 3) + rng.uniform(-30, 30, 3)
    return out


def mixed_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    bg = background(rng, height, width)
    if rng.random() < 0.35:
        bg = bg + rng.uniform(0.2, 0.55) * (background(rng, height, width) - bg)
    return bg


# ------------------------------------------------------------------------------------------ drawing


def _fill(rng: np.random.Generator, colour: np.ndarray, h: int, w: int) -> np.ndarray:
    """What fills an object's patch: a solid colour, a gentle gradient or speckle around ``colour``."""
    r = rng.random()
    if r < 0.7:
        return np.broadcast_to(colour, (h, w, 3))
    if r < 0.88:
        x, y = _coords(h, w)
        a = rng.uniform(0, 2 * math.pi)
        t = x * math.cos(a) + y * math.sin(a)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6) - 0.5
        return colour + t[:, :, None] * rng.uniform(-60, 60, 3)
    return colour + rng.normal(0, rng.uniform(8, 25), (h, w, 3))


def _pick_colour(rng: np.random.Generator, local: np.ndarray) -> np.ndarray:
    """A colour that differs from the mean ``local`` background by a margin, most of the time."""
    need = rng.uniform(70, 140) if rng.random() < 0.88 else rng.uniform(30, 60)
    best, best_d = None, -1.0
    for _ in range(24):
        c = _colour(rng)
        d = float(np.linalg.norm(c - local))
        if d >= need:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _visible_ok(obj: Object, threshold: float) -> bool:
    full = int((obj.alpha >= 0.5).sum())
    vis = int((obj.visible >= 0.5).sum())
    return vis >= MIN_VISIBLE_PIXELS and vis >= threshold * max(full, 1)


def _overlap(a: Object, b: Object) -> tuple[slice, slice, slice, slice] | None:
    """Slices of the overlap of two patches, in ``a``'s and in ``b``'s coordinates."""
    ax0, ay0 = a.origin
    bx0, by0 = b.origin
    ah, aw = a.alpha.shape
    bh, bw = b.alpha.shape
    x0, y0 = max(ax0, bx0), max(ay0, by0)
    x1, y1 = min(ax0 + aw, bx0 + bw), min(ay0 + ah, by0 + bh)
    if x1 <= x0 or y1 <= y0:
        return None
    return (
        slice(y0 - ay0, y1 - ay0),
        slice(x0 - ax0, x1 - ax0),
        slice(y0 - by0, y1 - by0),
        slice(x0 - bx0, x1 - bx0),
    )


def _occludes(new: Object, drawn: list[Object]) -> list[tuple[Object, np.ndarray]] | None:
    """The visible coverage every earlier shape would keep under ``new``, or None if one would drop
    below :data:`MIN_PLACE_VISIBLE`."""
    updates = []
    for old in drawn:
        if not old.is_shape:
            continue
        ov = _overlap(old, new)
        if ov is None:
            continue
        oy, ox, ny, nx = ov
        vis = old.visible.copy()
        vis[oy, ox] *= 1.0 - new.alpha[ny, nx]
        trial = Object(old.polygon, old.category_id, old.size, old.alpha, old.origin, vis)
        if not _visible_ok(trial, MIN_PLACE_VISIBLE):
            return None
        updates.append((old, vis))
    return updates


def _place(
    rng: np.random.Generator, outline: np.ndarray, height: int, width: int, near: Object | None
) -> np.ndarray | None:
    lo, hi = outline.min(0), outline.max(0)
    xmin, xmax = 1 - lo[0], width - 1 - hi[0]
    ymin, ymax = 1 - lo[1], height - 1 - hi[1]
    if xmax < xmin or ymax < ymin:
        return None
    if near is not None:
        c = near.polygon.mean(0) + rng.normal(0, near.size / 2.5, 2)
        cx, cy = float(np.clip(c[0], xmin, xmax)), float(np.clip(c[1], ymin, ymax))
    else:
        cx, cy = rng.uniform(xmin, xmax), rng.uniform(ymin, ymax)
    return outline + np.array([cx, cy])


def render_scene(seed: int, index: int, size: tuple[int, int] | None = None) -> Scene:
    """Draw image ``index`` of the set ``seed``; the :class:`Scene` keeps every object's geometry."""
    rng = np.random.default_rng([int(seed), int(index)])
    if size is None:
        height, width = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, 2))
    else:
        height, width = (int(v) for v in size)
    canvas = mixed_background(rng, height, width).astype(np.float32)
    n_shapes = int(rng.integers(1, MAX_OBJECTS + 1))
    n_occluders = int(rng.integers(0, 6))
    order = rng.permutation([1] * n_shapes + [0] * n_occluders)
    drawn: list[Object] = []
    for is_shape in order:
        if is_shape:
            cat = int(rng.integers(1, len(CLASSES) + 1))
            size_px = rng.uniform(*OBJECT_SIZE)
            outline = shape_polygon(rng, cat, size_px)
        else:
            cat = 0
            outline, size_px = occluder_polygon(rng)
        shapes = [o for o in drawn if o.is_shape]
        near = shapes[int(rng.integers(len(shapes)))] if shapes and rng.random() < (0.25 if cat else 0.5) else None
        obj, updates = None, None
        for _ in range(20):
            poly = _place(rng, outline, height, width, near)
            if poly is None:
                break
            alpha, origin = rasterize(poly, height, width)
            trial = Object(poly, cat, float(size_px), alpha, origin, alpha.copy())
            if cat and not _visible_ok(trial, 1.0 - 1e-6):  # too small to label at all
                break
            updates = _occludes(trial, drawn)
            if updates is not None:
                obj = trial
                break
            near = None  # retry anywhere
        if obj is None:
            continue
        for old, vis in updates:
            old.visible = vis
        x0, y0 = obj.origin
        h, w = obj.alpha.shape
        region = canvas[y0 : y0 + h, x0 : x0 + w]
        inside = obj.alpha >= 0.5
        local = region[inside].mean(0) if inside.any() else region.reshape(-1, 3).mean(0)
        fill = _fill(rng, _pick_colour(rng, local), h, w)
        a = obj.alpha[:, :, None]
        region *= 1.0 - a
        region += a * fill
        drawn.append(obj)
    canvas += rng.normal(0, rng.uniform(0, 8), canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    if rng.random() < 0.25:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9))))
    return Scene(np.ascontiguousarray(image), drawn)


def generate(seed: int, index: int, size: tuple[int, int] | None = None) -> tuple[np.ndarray, list[dict]]:
    """Image ``index`` of the set ``seed``: ``(uint8 (H, W, 3) RGB, COCO annotations)``.

    ``size`` ``(H, W)`` fixes the image size; by default each side is 256-480 px. Each annotation is
    ``{"bbox": [x, y, w, h], "category_id": 1..4, "area": visible pixels, "iscrowd": 0}``.
    """
    scene = render_scene(seed, index, size)
    return scene.image, scene.annotations()


def coco_dataset(seed: int, count: int, start: int = 0) -> tuple[list[np.ndarray], dict]:
    """Images ``start .. start + count - 1`` of the set ``seed`` and their COCO ground-truth dict.

    Image ids are ``index + 1``; file names ``{index:06d}.png``.
    """
    images, infos, anns = [], [], []
    for i in range(start, start + count):
        img, labels = generate(seed, i)
        images.append(img)
        infos.append({"id": i + 1, "file_name": f"{i:06d}.png", "height": img.shape[0], "width": img.shape[1]})
        for a in labels:
            anns.append({**a, "id": len(anns) + 1, "image_id": i + 1})
    coco = {
        "info": {"description": f"attn-export synthetic shapes, seed {seed}", "version": "1"},
        "images": infos,
        "annotations": anns,
        "categories": CATEGORIES,
    }
    return images, coco


def write_coco(folder: str | os.PathLike, seed: int, count: int, start: int = 0) -> Path:
    """Write ``count`` images (PNG) and ``instances.json`` (COCO detection format) into ``folder``."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, coco = coco_dataset(seed, count, start)
    for img, info in zip(images, coco["images"], strict=True):
        with atomic_path(folder / "images" / info["file_name"]) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
    path = folder / "instances.json"
    write_text(path, json.dumps(coco))
    return path
