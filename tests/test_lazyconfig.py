"""LazyConfig files (configs/COCO, configs/toy) and the yacs Cascade configs: every config builds;
LazyConfig and yacs models of one recipe have the same parameters and outputs; official-format
checkpoints of Detectron2's own models load strictly into the atc_ configs; tools/train_net.py
trains and evaluates LazyConfig files and stops bad input with one error line."""
import contextlib
import glob
import importlib.util
import os
import re
import subprocess
import sys
from unittest import mock

import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import META_ARCH_REGISTRY

from atc_det.engine import Checkpointer, load_config
from atc_det.lazy_trainer import load_lazy_config
from atc_det.modeling.atc_vit import ATCBlock
from conftest import CONFIGS, ROOT, TINY_VIT, lazy_vitdet, write_model_zoo_pkl

TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
LAZY_CONFIGS = sorted(os.path.relpath(p, CONFIGS) for p in glob.glob(f"{CONFIGS}/*/*.py")
                      if not p.startswith(os.path.join(CONFIGS, "common")))
YACS_CONFIGS = sorted(os.path.basename(p) for p in glob.glob(f"{CONFIGS}/*.yaml"))
# (LazyConfig file, yacs file) of one recipe.
RECIPES = [(f"COCO/{kind}_vitdet_{size}.py", f"{yacs}_{size[0]}.yaml")
           for size in ("b_100ep", "l_100ep", "h_75ep")
           for kind, yacs in (("mask_rcnn", "vitdet"), ("cascade_mask_rcnn", "cascade_vitdet"))]


@contextlib.contextmanager
def no_weight_init():
    """Build models without drawing initial weights (parameters stay torch.empty): shapes and
    names only, fast for ViT-L / ViT-H."""
    keep = lambda tensor, *args, **kwargs: tensor  # noqa: E731
    with mock.patch.object(torch.nn.Linear, "reset_parameters", lambda self: None), \
            mock.patch.object(torch.nn.modules.conv._ConvNd, "reset_parameters", lambda self: None), \
            mock.patch.multiple(torch.nn.init, trunc_normal_=keep, normal_=keep, kaiming_normal_=keep):
        yield


def lazy_model(name: str, overrides=()) -> torch.nn.Module:
    cfg = load_lazy_config(os.path.join(CONFIGS, name), list(overrides))
    return instantiate(cfg.model).eval()


def yacs_model(name: str, opts=()) -> torch.nn.Module:
    cfg = load_config(os.path.join(CONFIGS, name), ["MODEL.DEVICE", "cpu", *opts])
    return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg).eval()


def shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def box_stages(model: torch.nn.Module) -> list:
    """What each box stage does beyond its parameters: test threshold, NMS, top-k, regression
    weights, class-agnostic regression, and the IoU that matches proposals in training."""
    heads = model.roi_heads
    predictors = getattr(heads, "box_predictor")
    predictors = list(predictors) if isinstance(predictors, torch.nn.ModuleList) else [predictors]
    matchers = getattr(heads, "proposal_matchers", None) or [heads.proposal_matcher]
    return [(p.test_score_thresh, p.test_nms_thresh, p.test_topk_per_image,
             tuple(p.box2box_transform.weights), p.bbox_pred.out_features, m.thresholds)
            for p, m in zip(predictors, matchers)]


@pytest.mark.parametrize("name", LAZY_CONFIGS)
def test_every_lazy_config_instantiates(name):
    cfg = load_lazy_config(os.path.join(CONFIGS, name))
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg.keys())
    with no_weight_init():
        model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    schedule = instantiate(cfg.lr_multiplier)  # warm-up from 0.001, then 1, 0.1, 0.01
    assert (schedule(0.0), schedule(0.999)) == (pytest.approx(0.001), pytest.approx(0.01))
    reduced = [isinstance(b, ATCBlock) for b in model.backbone.net.blocks]
    assert reduced == ([False] + [True] * (len(reduced) - 1) if "atc_" in name else [False] * len(reduced))


@pytest.mark.parametrize("name", YACS_CONFIGS)
def test_every_yacs_config_instantiates(name):
    with no_weight_init():
        model = yacs_model(name)
    assert set(model.backbone.output_shape()) >= {"p2", "p3", "p4", "p5"}


@pytest.mark.parametrize("lazy, yacs", RECIPES)
def test_lazy_and_yacs_recipes_build_the_same_parameters(lazy, yacs):
    """Per recipe, the LazyConfig model, its atc_ variant and the yacs model (and its atc_
    variant) have the same parameter names and shapes: official checkpoints fit all four."""
    with no_weight_init():
        reference = lazy_model(lazy)
        for model in (lazy_model(f"COCO/atc_{os.path.basename(lazy)}"), yacs_model(yacs),
                      yacs_model(f"atc_{yacs}")):
            assert shapes(model) == shapes(reference)
            assert box_stages(model) == box_stages(reference)
    stages = box_stages(reference)
    assert [s[0] for s in stages] == [0.05] * len(stages)
    assert len(stages) == (3 if "cascade" in lazy else 1)


def test_recipes_keep_the_official_values():
    """Values of Detectron2's projects/ViTDet/configs/COCO files, written out here."""
    b = LazyConfig.load(os.path.join(CONFIGS, "COCO/mask_rcnn_vitdet_b_100ep.py"))
    assert (b.train.max_iter, b.train.amp.enabled, b.train.ddp.fp16_compression) == (184375, True, True)
    assert list(b.lr_multiplier.scheduler.milestones) == [163889, 177546]
    assert b.optimizer.params.lr_factor_func.keywords == {"num_layers": 12, "lr_decay_rate": 0.7}
    assert (b.optimizer.lr, b.optimizer.weight_decay, b.dataloader.train.total_batch_size) == (1e-4, 0.1, 64)
    assert b.train.init_checkpoint == (
        "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth?matching_heuristics=True")
    assert (b.lr_multiplier.warmup_length, b.lr_multiplier.warmup_factor) == (250 / 184375, 0.001)
    assert b.optimizer.params.overrides == {"pos_embed": {"weight_decay": 0.0}}
    assert b.model.backbone.net.drop_path_rate == 0.1
    flip, scale, crop = b.dataloader.train.mapper.augmentations
    assert (flip._target_.__name__, flip.horizontal) == ("RandomFlip", True)
    assert (scale._target_.__name__, scale.min_scale, scale.max_scale, scale.target_height,
            scale.target_width) == ("ResizeScale", 0.1, 2.0, 1024, 1024)
    assert (crop._target_.__name__, tuple(crop.crop_size), crop.pad) == ("FixedSizeCrop", (1024, 1024), False)
    mapper = b.dataloader.train.mapper
    assert (mapper.image_format, mapper.recompute_boxes, mapper.use_instance_mask) == ("RGB", True, True)
    (test_resize,) = b.dataloader.test.mapper.augmentations
    assert (test_resize.short_edge_length, test_resize.max_size) == (1024, 1024)
    large = LazyConfig.load(os.path.join(CONFIGS, "COCO/mask_rcnn_vitdet_l_100ep.py"))
    net = large.model.backbone.net
    assert (net.embed_dim, net.depth, net.num_heads, net.drop_path_rate) == (1024, 24, 16, 0.4)
    assert large.train.init_checkpoint.endswith("/mae_pretrain_vit_large.pth?matching_heuristics=True")
    assert large.optimizer.params.lr_factor_func.keywords == {"num_layers": 24, "lr_decay_rate": 0.8}
    h = LazyConfig.load(os.path.join(CONFIGS, "COCO/cascade_mask_rcnn_vitdet_h_75ep.py"))
    net = h.model.backbone.net
    assert (net.embed_dim, net.depth, net.num_heads, net.drop_path_rate) == (1280, 32, 16, 0.5)
    assert sorted(set(range(32)) - set(net.window_block_indexes)) == [7, 15, 23, 31]
    assert (h.train.max_iter, list(h.lr_multiplier.scheduler.milestones)) == (138281, [122916, 133159])
    assert h.optimizer.params.lr_factor_func.keywords == {"num_layers": 32, "lr_decay_rate": 0.9}
    assert (h.optimizer.params.overrides, h.optimizer.params.weight_decay_norm) == ({}, None)
    assert h.train.init_checkpoint.endswith("/mae_pretrain_vit_huge_p14to16.pth?matching_heuristics=True")
    assert all(head.conv_norm == "LN" and list(head.conv_dims) == [256] * 4 and list(head.fc_dims) == [1024]
               for head in h.model.roi_heads.box_heads)
    assert [tuple(p.box2box_transform.weights) for p in h.model.roi_heads.box_predictors] == [
        (10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert all(p.cls_agnostic_bbox_reg for p in h.model.roi_heads.box_predictors)
    assert [m.thresholds for m in h.model.roi_heads.proposal_matchers] == [[0.5], [0.6], [0.7]]
    l_net = LazyConfig.load(os.path.join(CONFIGS, "COCO/atc_mask_rcnn_vitdet_l_100ep.py")).model.backbone.net
    assert sorted(set(range(24)) - set(l_net.window_block_indexes)) == [5, 11, 17, 23]
    assert (l_net.atc.keep_rate, l_net.atc.linkage, l_net.atc.mode) == (0.5, "average", "dense")
    ft = LazyConfig.load(os.path.join(CONFIGS, "COCO/atc_finetune_cascade_mask_rcnn_vitdet_b.py"))
    assert ft.train.init_checkpoint.endswith("cascade_mask_rcnn_vitdet_b/f325358525/model_final_435fa9.pkl")
    assert (ft.train.max_iter, ft.optimizer.lr) == (184375 // 2, pytest.approx(1e-5))


# --- Detectron2's own models, official-format checkpoints -------------------------------------

TINY_LAZY = [f"model.backbone.net.{k}={v}" for k, v in TINY_VIT.items()] + [
    f"model.backbone.square_pad={TINY_VIT['img_size']}"]
TINY_YACS = ["MODEL.VIT.IMG_SIZE", "320", "MODEL.VIT.EMBED_DIM", "64", "MODEL.VIT.DEPTH", "3",
             "MODEL.VIT.NUM_HEADS", "4", "MODEL.VIT.WINDOW_BLOCK_INDEXES", "[0, 2]",
             "MODEL.SFP.SQUARE_PAD", "320", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


def detectron2_cascade(num_classes: int = 80, **vit_overrides) -> torch.nn.Module:
    """Detectron2's Cascade Mask R-CNN ViTDet as its official cascade_mask_rcnn_vitdet_b_100ep.py
    builds it: model_zoo's common/models/mask_rcnn_vitdet.py with CascadeROIHeads (three
    class-agnostic 4conv1fc stages), written out here from Detectron2's classes."""
    from detectron2 import model_zoo
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.modeling.matcher import Matcher
    from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

    model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
    model.backbone.net.update(vit_overrides)
    if "img_size" in vit_overrides:
        model.backbone.square_pad = vit_overrides["img_size"]
    heads = model.roi_heads
    heads.num_classes = num_classes
    for key in ("box_head", "box_predictor", "proposal_matcher"):
        del heads[key]
    heads._target_ = CascadeROIHeads
    heads.box_heads = [L(FastRCNNConvFCHead)(input_shape=ShapeSpec(channels=256, height=7, width=7),
                                             conv_dims=[256, 256, 256, 256], fc_dims=[1024],
                                             conv_norm="LN") for _ in range(3)]
    heads.box_predictors = [
        L(FastRCNNOutputLayers)(input_shape=ShapeSpec(channels=1024), test_score_thresh=0.0,
                                box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
                                cls_agnostic_bbox_reg=True, num_classes=num_classes)
        for w1, w2 in ((10, 5), (20, 10), (30, 15))]
    heads.proposal_matchers = [L(Matcher)(thresholds=[t], labels=[0, 1], allow_low_quality_matches=False)
                               for t in (0.5, 0.6, 0.7)]
    return instantiate(model).eval()


def randomize_rel_pos(model: torch.nn.Module) -> torch.nn.Module:
    """Detectron2 zero-initialises the rel-pos tables: draw them so relative positions matter."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name:
                param.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("kind", ["mask_rcnn", "cascade_mask_rcnn"])
def test_official_format_checkpoint_loads_strictly_into_atc_config(kind, tmp_path):
    """A model_final.pkl written from Detectron2's own ViTDet-B model (Mask R-CNN: model_zoo's
    config; Cascade: its official construction) loads into configs/COCO/atc_<kind>_vitdet_b_100ep.py
    with no missing, unexpected or mis-shaped key, and every value arrives."""
    torch.manual_seed(0)
    theirs = lazy_vitdet() if kind == "mask_rcnn" else detectron2_cascade()
    path = str(tmp_path / "model_final.pkl")
    write_model_zoo_pkl(path, theirs.state_dict())
    with no_weight_init():
        mine = lazy_model(f"COCO/atc_{kind}_vitdet_b_100ep.py")
    Checkpointer(mine, strict=True, hint=Checkpointer.LAZY_HINT).load(path)  # raises on mismatch
    loaded = mine.state_dict()
    for key, value in theirs.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert isinstance(mine.backbone.net.blocks[1], ATCBlock)


@pytest.mark.parametrize("atc", [False, True])
def test_cascade_lazy_and_yacs_give_the_same_outputs(atc):
    """Detectron2's cascade weights in the LazyConfig and the yacs Cascade models (tiny ViT, with
    or without ATC): the same backbone features and detections."""
    theirs = randomize_rel_pos(detectron2_cascade(**TINY_VIT))
    prefix = "atc_" if atc else ""
    lazy = lazy_model(f"COCO/{prefix}cascade_mask_rcnn_vitdet_b_100ep.py", TINY_LAZY + [
        f"model.roi_heads.box_predictors.{i}.test_score_thresh=0.0" for i in range(3)])
    yacs = yacs_model(f"{prefix}cascade_vitdet_b.yaml", TINY_YACS)
    for model in (lazy, yacs):
        model.load_state_dict(theirs.state_dict(), strict=True)
    torch.manual_seed(1)
    inputs = [{"image": torch.randint(0, 255, (3, 200, 296)).float(), "height": 200, "width": 296}]
    with torch.no_grad():
        outputs = [model(inputs)[0]["instances"] for model in (theirs, lazy, yacs)]
    if not atc:
        torch.testing.assert_close(outputs[0].pred_boxes.tensor, outputs[1].pred_boxes.tensor)
    a, b = outputs[1:]
    assert len(a) > 0 and len(a) == len(b)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.pred_masks, b.pred_masks)


def test_toy_lazyconfig_is_the_yacs_toy():
    """The same model, data and schedule as configs/toy_vitdet.yaml (without gradient clipping)."""
    with no_weight_init():
        assert shapes(lazy_model("toy/mask_rcnn_vitdet_toy.py")) == shapes(yacs_model("toy_vitdet.yaml"))
    lazy = load_lazy_config(os.path.join(CONFIGS, "toy/mask_rcnn_vitdet_toy.py"))
    yacs = load_config(os.path.join(CONFIGS, "toy_vitdet.yaml"))
    solver, schedule = yacs.SOLVER, lazy.lr_multiplier
    assert (lazy.train.max_iter, list(schedule.scheduler.milestones)) == (solver.MAX_ITER, list(solver.STEPS))
    assert (schedule.warmup_length * lazy.train.max_iter, schedule.warmup_factor) == (
        solver.WARMUP_ITERS, solver.WARMUP_FACTOR)
    assert (lazy.optimizer.lr, lazy.optimizer.weight_decay) == (solver.BASE_LR, solver.WEIGHT_DECAY)
    assert (lazy.dataloader.train.total_batch_size, lazy.train.seed) == (solver.IMS_PER_BATCH, yacs.SEED)
    assert (lazy.dataloader.train.dataset.names, lazy.dataloader.test.dataset.names) == (
        yacs.DATASETS.TRAIN[0], yacs.DATASETS.TEST[0])
    mapper = lazy.dataloader.train.mapper
    assert (mapper.image_format, mapper.instance_mask_format) == (yacs.INPUT.FORMAT, yacs.INPUT.MASK_FORMAT)
    resize = mapper.augmentations[0]
    assert (tuple(resize.short_edge_length), resize.max_size) == (
        tuple(yacs.INPUT.MIN_SIZE_TRAIN), yacs.INPUT.MAX_SIZE_TRAIN)
    (test_resize,) = lazy.dataloader.test.mapper.augmentations
    assert (test_resize.short_edge_length, test_resize.max_size) == (
        yacs.INPUT.MIN_SIZE_TEST, yacs.INPUT.MAX_SIZE_TEST)


def test_with_atc_refuses_other_nodes():
    from atc_det.modeling.lazy import with_atc

    cfg = LazyConfig.load(os.path.join(CONFIGS, "toy/mask_rcnn_vitdet_toy.py"))
    with pytest.raises(TypeError, match="LazyCall node of a detectron2.modeling.ViT"):
        with_atc(cfg.model.backbone, keep_rate=0.5)


# --- tools/train_net.py with LazyConfig files ---------------------------------------------------

# A smaller toy model and data loading for quick runs.
FAST = ["model.backbone.net.embed_dim=64", "model.backbone.net.num_heads=2",
        "model.backbone.net.depth=2", "model.backbone.net.window_block_indexes=[0]",
        "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "dataloader.train.total_batch_size=2"]


def run(args, env, timeout=600):
    return subprocess.run([sys.executable, TRAIN_NET, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1", **env))


@pytest.mark.parametrize("config", ["toy/mask_rcnn_vitdet_toy.py", "toy/atc_mask_rcnn_vitdet_toy.py"])
def test_toy_lazyconfig_trains_and_evaluates(config, small_toy, tmp_path):
    out = str(tmp_path / "out")
    p = run(["--config-file", f"configs/{config}", *FAST, "train.max_iter=3",
             "train.checkpointer.period=2", f"train.output_dir={out}"], small_toy)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^segm AP: \d+\.\d\d  AP50: ", p.stdout, re.M), p.stdout[-2000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "Starting training from iteration 0" in log
    assert ("ATCBlock" in log) == ("atc_" in config)  # the model printed in the log
    p = run(["--config", f"configs/{config}", "--eval-only", *FAST,
             f"train.init_checkpoint={out}/model_final.pth", f"train.output_dir={out}"], small_toy)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^bbox AP: \d+\.\d\d  AP50: ", p.stdout, re.M), p.stdout[-2000:]
    assert os.path.isfile(os.path.join(out, "inference", "toy_shapes_val", "coco_instances_results.json"))


def test_lazyconfig_resume_and_two_processes(small_toy, tmp_path):
    out = str(tmp_path / "out")
    args = ["--config-file", "configs/toy/atc_mask_rcnn_vitdet_toy.py", *FAST,
            "train.checkpointer.period=2", f"train.output_dir={out}"]
    p = run(["--num-gpus", "2", *args, "train.max_iter=2"], small_toy)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Rank of current process: 0. World size: 2" in open(os.path.join(out, "log.txt")).read()
    last = open(os.path.join(out, "last_checkpoint")).read().strip()
    p = run(["--resume", *args, "train.max_iter=4"], small_toy)
    assert p.returncode == 0, p.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert f"Loading from {os.path.join(out, last)}" in log
    assert "Starting training from iteration 2" in log


def test_official_checkpoint_eval_only_through_the_tool(small_toy, tmp_path, tool_error):
    """--eval-only train.init_checkpoint=<official-format .pkl> on the atc_ Cascade config (a tiny
    ViT, the toy's 4 classes): loads strictly and evaluates; a mismatched one is one error line."""
    path = str(tmp_path / "model_final.pkl")
    write_model_zoo_pkl(path, detectron2_cascade(num_classes=4, **TINY_VIT).state_dict())
    args = ["--config-file", "configs/COCO/atc_cascade_mask_rcnn_vitdet_b_100ep.py", "--eval-only",
            *TINY_LAZY, "dataloader.test.dataset.names=toy_shapes_val",
            "dataloader.test.num_workers=0", "dataloader.test.mapper.augmentations.0.short_edge_length=256",
            "dataloader.test.mapper.augmentations.0.max_size=320", f"train.output_dir={tmp_path}/out",
            "model.proposal_generator.post_nms_topk=[1000,20]"]  # 3 box stages on 20 proposals
    p = run([*args, f"train.init_checkpoint={path}", "model.roi_heads.num_classes=4"], small_toy)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^segm AP: \d+\.\d\d  AP50: ", p.stdout, re.M), p.stdout[-2000:]
    line = tool_error("train_net.py", *args, f"train.init_checkpoint={path}", env=small_toy)
    assert "checkpoint keys don't match the model" in line and "shape mismatch" in line
    assert "model.roi_heads.num_classes" in line


TOY_LAZY = os.path.join(CONFIGS, "toy", "atc_mask_rcnn_vitdet_toy.py")


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["train.max_iterr=3"], KeyError, "unknown config key: train.max_iterr"),
        (["model.backbone.net.atc.keep_ratio=0.5"], KeyError,
         "unknown config key: model.backbone.net.atc.keep_ratio"),
        (["train.max_iter=many"], ValueError, "type mismatch for train.max_iter"),
        (["train.max_iter=1.5"], ValueError, "type mismatch for train.max_iter"),
        (["model.backbone.net.dept=24"], KeyError, "unknown config key: model.backbone.net.dept"),
        (["train.amp.enabled=1"], ValueError, "type mismatch for train.amp.enabled"),
        (["train.max_iter", "3"], ValueError, "override 'train.max_iter' is not key=value"),
        (["model.backbone.net.atc.keep_rate=1.5"], ValueError,
         "model.backbone.net.atc: keep_rate (MODEL.ATC.KEEP_RATE) is the fraction"),
        (["model.backbone.net.atc.linkage=ward"], ValueError, "model.backbone.net.atc: linkage"),
        (["dataloader.test.dataset.names=coco_2017_val"], FileNotFoundError,
         "coco/annotations/instances_val2017.json"),
        (["dataloader.test.dataset.names=my_data"], KeyError, "dataset 'my_data' is not registered"),
        (["train.init_checkpoint={tmp}/missing.pth"], FileNotFoundError,
         "train.init_checkpoint '{tmp}/missing.pth' is not a file"),
    ],
)
def test_lazyconfig_bad_input_is_one_clear_error(overrides, error, message, tmp_path, small_toy,
                                                 monkeypatch):
    """What tools/train_net.py checks before starting workers (it prints the message as its one
    error line: test_lazyconfig_bad_input_through_the_tool)."""
    from atc_det.lazy_trainer import check_lazy_inputs

    monkeypatch.setenv("DETECTRON2_DATASETS", small_toy["DETECTRON2_DATASETS"])
    with pytest.raises(error) as raised:
        cfg = load_lazy_config(TOY_LAZY, [o.format(tmp=tmp_path) for o in overrides])
        check_lazy_inputs(cfg, eval_only=True, resume=False)
    text = raised.value.args[0] if error is KeyError else str(raised.value)
    assert message.format(tmp=tmp_path) in text


def test_lazyconfig_overrides_keep_types():
    cfg = load_lazy_config(TOY_LAZY, ["train.max_iter=1e3", "optimizer.lr=1", "model.backbone.net.depth=2",
                                      "model.backbone.net.atc.keep_rate=0.25", "train.amp.enabled=False"])
    assert (type(cfg.train.max_iter), cfg.train.max_iter, cfg.optimizer.lr) == (int, 1000, 1)
    assert (cfg.model.backbone.net.depth, cfg.model.backbone.net.atc.keep_rate) == (2, 0.25)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eval-only", "train.max_iterr=3"], "unknown config key: train.max_iterr"),
        # found while the model is built and loaded, in the worker
        (["--eval-only", "train.init_checkpoint={tmp}/other_model.pth"],
         "checkpoint keys don't match the model (missing in the checkpoint: ['backbone."),
        (["train.init_checkpoint={tmp}/other_model.pth"], "not in the model: ['backbone.net.not_a_parameter']"),
    ],
)
def test_lazyconfig_bad_input_through_the_tool(args, message, tmp_path, small_toy, tool_error):
    torch.save({"model": {"backbone.net.not_a_parameter": torch.zeros(3)}}, tmp_path / "other_model.pth")
    line = tool_error("train_net.py", "--config-file", TOY_LAZY, *(a.format(tmp=tmp_path) for a in args),
                      f"train.output_dir={tmp_path}/out", env=small_toy)
    assert message.format(tmp=tmp_path) in line


@pytest.mark.parametrize("config, message", [
    ("{tmp}/missing.py", "config file '{tmp}/missing.py' not found"),
    ("README.md", "config file 'README.md' is neither a LazyConfig (.py) nor a yacs config (.yaml)"),
])
def test_config_file_errors(config, message, tmp_path):
    spec = importlib.util.spec_from_file_location("train_net", TRAIN_NET)
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    args = train_net.parse_args(["--config-file", config.format(tmp=tmp_path)])
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(message.format(tmp=tmp_path))):
        train_net.check_inputs(args)
