"""Our yacs-built ViTDet Mask R-CNN equals Detectron2's own LazyConfig ViTDet model."""
import copy
import os

import pytest
import torch
from detectron2.modeling import build_model

from atc_det.engine import Checkpointer, load_config
from conftest import CONFIGS, lazy_vitdet, ours, tiny_vitdet_pair, write_model_zoo_pkl


def test_vitdet_b_same_parameters_as_detectron2():
    theirs = lazy_vitdet()
    mine, _ = ours("vitdet_b.yaml")
    a = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
    assert sorted(set(a) - set(b)) == [] and sorted(set(b) - set(a)) == []
    assert a == b
    assert sum(p.numel() for p in mine.parameters()) == sum(p.numel() for p in theirs.parameters())


@pytest.fixture(scope="module")
def tiny_pair():
    return tiny_vitdet_pair("vitdet_b.yaml")


def test_same_outputs_as_detectron2(tiny_pair):
    theirs, mine, _ = tiny_pair
    torch.manual_seed(1)
    inputs = [{"image": torch.randint(0, 255, (3, 200, 296)).float(), "height": 200, "width": 296}]
    with torch.no_grad():
        images = theirs.preprocess_image(inputs)
        fa, fb = theirs.backbone(images.tensor), mine.backbone(images.tensor)
        assert fa.keys() == fb.keys() == {"p2", "p3", "p4", "p5", "p6"}
        for k in fa:
            torch.testing.assert_close(fa[k], fb[k], rtol=0, atol=0)
        ra, rb = theirs(inputs)[0]["instances"], mine(inputs)[0]["instances"]
    assert len(ra) > 0 and len(ra) == len(rb)
    torch.testing.assert_close(ra.pred_boxes.tensor, rb.pred_boxes.tensor)
    torch.testing.assert_close(ra.scores, rb.scores)
    torch.testing.assert_close(ra.pred_masks, rb.pred_masks)


def test_image_smaller_than_one_window(tiny_pair):
    """A 48x64 input (3x4 patches, less than one 14x14 window) gives Detectron2's own output."""
    theirs, mine, _ = tiny_pair
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        fa, fb = theirs.backbone(x), mine.backbone(x)
    assert fb["p2"].shape == (2, 256, 12, 16)
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=0, atol=0)


def test_official_format_pkl_loads_without_missing_or_unexpected_keys(tiny_pair, tmp_path):
    theirs, _, cfg = tiny_pair
    path = str(tmp_path / "model_final.pkl")
    write_model_zoo_pkl(path, theirs.state_dict())
    fresh = build_model(cfg)
    Checkpointer(fresh, strict=True).load(path)  # raises on any key mismatch
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)


def test_mismatched_checkpoint_is_one_clear_error(tiny_pair, tmp_path):
    theirs, _, cfg = tiny_pair
    sd = copy.copy(theirs.state_dict())
    sd["backbone.net.blocks.0.attn.qkv.weightX"] = sd.pop("backbone.net.blocks.0.attn.qkv.weight")
    path = str(tmp_path / "bad.pkl")
    write_model_zoo_pkl(path, sd)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        Checkpointer(build_model(cfg), strict=True).load(path)

    sd = copy.copy(theirs.state_dict())
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(5, 1024)
    write_model_zoo_pkl(path, sd)
    with pytest.raises(ValueError, match="shape mismatch"):
        Checkpointer(build_model(cfg), strict=True).load(path)


def test_unknown_config_key_is_one_clear_error():
    with pytest.raises(KeyError, match="MODEL.ATC.KEEP_RATIO"):
        load_config(os.path.join(CONFIGS, "toy_vitdet.yaml"), ["MODEL.ATC.KEEP_RATIO", "0.5"])


@pytest.mark.parametrize(
    "name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml") and f[0].islower())
)
def test_every_config_loads(name):
    cfg = load_config(os.path.join(CONFIGS, name))
    assert cfg.MODEL.BACKBONE.NAME in ("build_vitdet_backbone", "build_secvit_fpn_backbone")


def test_official_recipes():
    b = load_config(os.path.join(CONFIGS, "vitdet_b.yaml"))
    assert (b.SOLVER.LR_DECAY_RATE, b.SOLVER.MAX_ITER, b.SOLVER.IMS_PER_BATCH) == (0.7, 184375, 64)
    assert b.INPUT.LSJ.ENABLED and b.INPUT.LSJ.IMAGE_SIZE == 1024 and b.SOLVER.OPTIMIZER == "ADAMW"
    h = load_config(os.path.join(CONFIGS, "vitdet_h.yaml"))
    assert len(h.MODEL.VIT.WINDOW_BLOCK_INDEXES) == 28 and h.MODEL.VIT.EMBED_DIM == 1280
