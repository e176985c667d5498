"""Shared fixtures and helpers. Plain helpers are imported by the tests as ``from conftest import
...`` (pytest puts tests/ on sys.path); ``repo_root`` and ``tool_error`` are fixtures.

Detectron2 is imported inside the helpers that need it, so that tests without it stay light."""
import os
import pickle
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

# Triton kernels run on CPU tensors through Triton's interpreter (read when triton is imported).
os.environ["TRITON_INTERPRET"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
sys.path.insert(0, ROOT)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# A small ViTDet: 20x20 patches at 320 px, so 14x14 windows are padded.
TINY_VIT = dict(img_size=320, embed_dim=64, depth=3, num_heads=4, window_block_indexes=[0, 2])


@pytest.fixture(scope="session")
def repo_root() -> str:
    return ROOT


@pytest.fixture(scope="session")
def tool_error() -> Callable[..., str]:
    """``tool_error(tool, *args, env=None)`` runs ``tools/<tool>`` in a subprocess, asserts that it
    stopped with exit status 2 and one ``error: ...`` line, the last of stderr, without a
    traceback, and returns that line."""

    def run(tool: str, *args: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", tool), *args], cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), capture_output=True,
            text=True, timeout=600,
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        errors = [line for line in lines if line.startswith("error: ")]
        assert lines and errors == [lines[-1]], result.stderr[-3000:]
        return lines[-1]

    return run


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory):
    """(Environment for tools/*) a small toy dataset (16 train / 8 val images) under a private DETECTRON2_DATASETS."""
    from atc_det.data.toy_shapes import generate_toy_shapes

    root = tmp_path_factory.mktemp("d2data")
    generate_toy_shapes(str(root / "toy_shapes"), splits={"train": 16, "val": 8})
    return {"DETECTRON2_DATASETS": str(root)}


def make_cfg(config_file: str | None = None, **keys):
    """A Detectron2 config with every atc_det key (get_cfg + add_atc_det_config), merged with
    ``config_file`` (a name in configs/, or a path) if given, then ``keys`` set: each a path
    under MODEL with ``__`` for ``.``, e.g. ``ATC__KEEP_RATE=[0.5]`` or ``DEVICE="cpu"``."""
    from detectron2.config import get_cfg

    from atc_det.config import add_atc_det_config

    cfg = get_cfg()
    add_atc_det_config(cfg)
    if config_file:
        cfg.merge_from_file(os.path.join(CONFIGS, config_file))
    for key, value in keys.items():
        *sections, name = key.split("__")
        node = cfg.MODEL
        for section in sections:
            node = getattr(node, section)
        setattr(node, name, value)
    return cfg


def small_vit(strong_rel_pos: bool = True, **overrides):
    """A small Detectron2 ViTDet ViT (windows of 14, global blocks 1 and 3), drawn with seed 0,
    in eval mode. ``strong_rel_pos``: the rel-pos tables redrawn with std 0.5, large enough to
    matter. ``overrides``: ViT arguments (drop_path_rate 0.1 unless given; it acts in training
    mode only)."""
    from detectron2.modeling import ViT

    torch.manual_seed(0)
    kwargs = dict(img_size=224, patch_size=16, embed_dim=64, depth=4, num_heads=4, window_size=14,
                  window_block_indexes=[0, 2], use_rel_pos=True, rel_pos_zero_init=False,
                  drop_path_rate=0.1)
    vit = ViT(**{**kwargs, **overrides}).eval()
    if strong_rel_pos:
        with torch.no_grad():
            for block in vit.blocks:
                if block.attn.use_rel_pos:
                    block.attn.rel_pos_h.normal_(std=0.5)
                    block.attn.rel_pos_w.normal_(std=0.5)
    return vit


def vit_features(model, images: torch.Tensor) -> torch.Tensor:
    """A ViT's output under no_grad: "last_feat" of Detectron2's dict, timm's tensor as it is."""
    with torch.no_grad():
        out = model(images)
    return out["last_feat"] if isinstance(out, dict) else out


def same_partition(a, b) -> bool:
    """Whether two label arrays group the same items together (whatever the label numbers)."""
    a, b = np.asarray(a), np.asarray(b)
    return bool(((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])).all())


def reference_groups(keys: torch.Tensor, num_groups: int) -> list:
    """SEC groups by brute force: rank tokens by cosine(key, mean key) and split the ranking
    into G chunks."""
    similarity = F.cosine_similarity(keys, keys.mean(0, keepdim=True), dim=-1)
    order = sorted(range(keys.shape[0]), key=lambda n: (similarity[n].item(), n))
    return [chunk.tolist() for chunk in torch.tensor_split(torch.tensor(order), num_groups)]


def lazy_vitdet(**vit_overrides):
    """Detectron2's own model from configs/common/models/mask_rcnn_vitdet.py."""
    from detectron2 import model_zoo
    from detectron2.config import instantiate

    cfg = model_zoo.get_config("common/models/mask_rcnn_vitdet.py")
    for k, v in vit_overrides.items():
        setattr(cfg.model.backbone.net, k, v)
    if "img_size" in vit_overrides:
        cfg.model.backbone.square_pad = vit_overrides["img_size"]
    cfg.model.roi_heads.box_predictor.test_score_thresh = 0.0
    return instantiate(cfg.model).eval()


def ours(config="vitdet_b.yaml", **vit_overrides):
    """Our yacs-built model of configs/<config> with the ViT arguments of ``vit_overrides``, on
    CPU and with score threshold 0; returns (model, cfg)."""
    from detectron2.modeling import build_model

    from atc_det.engine import load_config

    keys = {"img_size": "IMG_SIZE", "embed_dim": "EMBED_DIM", "depth": "DEPTH",
            "num_heads": "NUM_HEADS", "window_block_indexes": "WINDOW_BLOCK_INDEXES"}
    opts = ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    for k, v in vit_overrides.items():
        opts += [f"MODEL.VIT.{keys[k]}", str(v)]
    if "img_size" in vit_overrides:
        opts += ["MODEL.SFP.SQUARE_PAD", str(vit_overrides["img_size"])]
    cfg = load_config(os.path.join(CONFIGS, config), opts)
    return build_model(cfg).eval(), cfg


def tiny_vitdet_pair(config="vitdet_b.yaml"):
    """Detectron2's LazyConfig ViTDet at TINY_VIT (seed 0, rel-pos tables drawn with std 0.5 so
    relative positions matter) and ours from configs/<config> with its weights loaded strictly:
    (theirs, mine, cfg)."""
    torch.manual_seed(0)
    theirs = lazy_vitdet(**TINY_VIT)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "rel_pos" in name:  # zero-initialised: make relative positions matter
                param.normal_(0, 0.5)
    mine, cfg = ours(config, **TINY_VIT)
    mine.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, mine, cfg


def write_model_zoo_pkl(path, state_dict):
    """A checkpoint in the format of the official ViTDet model zoo ``model_final_*.pkl``."""
    data = {"model": {k: v.numpy() for k, v in state_dict.items()}, "__author__": "test"}
    with open(path, "wb") as f:
        pickle.dump(data, f)
