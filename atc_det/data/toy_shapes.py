"""Synthetic COCO-format instance segmentation dataset ("toy shapes").

Deterministic (seeded) images of filled shapes on textured backgrounds. Later shapes occlude
earlier ones; every instance's mask is the exact rasterisation of its visible region, stored as
COCO RLE (load with ``INPUT.MASK_FORMAT: bitmask``). Instances that are almost fully hidden are
dropped from the image (and their pixels stay painted), so every annotation is visible.
"""
import json
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

CATEGORIES = ["circle", "square", "triangle", "star"]
SPLITS = {"train": 320, "val": 64}
IMAGE_SIZE = 256
FORMAT_VERSION = 1
_MIN_VISIBLE_FRACTION = 0.3
_MIN_VISIBLE_PIXELS = 64


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: colour gradient + oriented stripes + noise, [size, size, 3] uint8."""
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


def _polygon(rng: np.random.Generator, category: str, size: int) -> np.ndarray:
    """Vertices [V, 2] (x, y) of a randomly placed, scaled and rotated shape."""
    radius = rng.uniform(0.08, 0.24) * size
    cx, cy = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
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
    ang = ang + rot
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)


def _render(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One image [size, size, 3] (RGB) and its visible instances as (category_id, bool mask)."""
    img = _texture(rng, size)
    owner = np.full((size, size), -1, np.int32)
    cats, full_areas = [], []
    for k in range(int(rng.integers(1, 6))):
        cat = int(rng.integers(len(CATEGORIES)))
        pts = np.round(_polygon(rng, CATEGORIES[cat], size) * 16).astype(np.int32)
        area = np.zeros((size, size), np.uint8)
        cv2.fillPoly(area, [pts], 1, lineType=cv2.LINE_8, shift=4)
        fill = _texture(rng, size) // 3 + rng.uniform(60, 170, 3).astype(np.uint8)
        img[area > 0] = fill[area > 0]
        owner[area > 0] = k
        cats.append(cat)
        full_areas.append(max(int(area.sum()), 1))
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


def generate_toy_shapes(root: str, seed: int = 0, splits: Dict[str, int] = SPLITS) -> None:
    """Write ``root/{split}/*.png`` and ``root/annotations/{split}.json`` for every split."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split_index, (split, count) in enumerate(sorted(splits.items())):
        rng = np.random.default_rng([seed, split_index])
        image_dir = os.path.join(root, split)
        os.makedirs(image_dir, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            img, instances = _render(rng, IMAGE_SIZE)
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
            "info": {"description": "atc_det toy shapes", "version": FORMAT_VERSION, "seed": seed},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)],
        }
        tmp = os.path.join(root, "annotations", f"{split}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(coco, f)
        os.replace(tmp, os.path.join(root, "annotations", f"{split}.json"))


def toy_shapes_ready(root: str) -> bool:
    """True when every split's annotation file exists (written last, atomically)."""
    return all(
        os.path.isfile(os.path.join(root, "annotations", f"{s}.json")) for s in SPLITS
    )
