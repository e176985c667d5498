"""The synthetic toy dataset: deterministic, exact masks, loadable by Detectron2's COCO loader."""
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import load_coco_json

from atc_det.data.toy_shapes import CATEGORIES, generate_toy_shapes
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
