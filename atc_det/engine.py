"""Detectron2 trainer for ViTDet (+ATC/SEC): AdamW with layer-wise lr decay, LSJ, COCO evaluation,
atomic checkpoints, strict weight loading, and DDP on CPU (gloo)."""
import logging
import os
import sys
from contextlib import contextmanager
from functools import partial
from typing import IO, Any, Dict, Iterator, List
from unittest import mock

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathManager as PathManagerBase

from .config import add_atc_det_config
from .data.datasets import prepare_datasets
import atc_det.modeling  # noqa: F401  (registers the ViTDet and SecViT backbones)

logger = logging.getLogger("atc_det")


class CheckedDatasetMapper(DatasetMapper):
    """Detectron2's DatasetMapper that names the image file when it cannot be read."""

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        try:
            return super().__call__(dataset_dict)
        except OSError as e:
            raise OSError(
                f"cannot read image {dataset_dict.get('file_name')!r} ({e}); fix or remove the "
                "file, or drop its record from the dataset's annotation json"
            ) from e


class _AtomicWrites:
    """Stands in for a path manager while ``Checkpointer.save`` runs: ``open(path, "w"/"wb")``
    writes ``path.tmp`` through the wrapped one, flushes it to disk and renames it over ``path``."""

    def __init__(self, path_manager: PathManagerBase):
        self.path_manager = path_manager

    @contextmanager
    def open(self, path: str, mode: str, **kwargs: Any) -> Iterator[IO]:
        tmp = f"{path}.tmp"
        with self.path_manager.open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class Checkpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic writes and strict loading.

    A checkpoint and the ``last_checkpoint`` tag are written to a temporary file and renamed, so a
    run killed at any moment leaves the previous checkpoint intact and ``--resume`` loses only the
    iterations since it. With ``strict``, loading weights whose keys do not match the model
    (missing, unexpected or with another shape) raises, unless loaded with matching heuristics.
    """

    YACS_HINT = ("Check that MODEL.* (e.g. MODEL.VIT size, ROI_HEADS.NUM_CLASSES) matches the "
                 "checkpoint, or set MODEL.WEIGHTS_STRICT False to load what matches.")
    LAZY_HINT = ("Check that the config's model (e.g. model.backbone.net size, "
                 "model.roi_heads.num_classes) matches the checkpoint, or load what matches with "
                 "\"train.init_checkpoint='<checkpoint>?matching_heuristics=True'\" (quoted).")

    def __init__(self, *args, strict: bool = True, hint: str = YACS_HINT, **kwargs):
        super().__init__(*args, **kwargs)
        self.strict, self.hint = strict, hint

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save`` (checkpoint, then ``last_checkpoint`` tag), each file written
        atomically (``save_dir`` must be local)."""
        path_manager = self.path_manager
        self.path_manager = _AtomicWrites(path_manager)
        try:
            super().save(name, **kwargs)
        finally:
            self.path_manager = path_manager

    def _load_model(self, checkpoint: Any):
        heuristics = checkpoint.get("matching_heuristics", False)
        incompatible = super()._load_model(checkpoint)
        if self.strict and not heuristics:
            problems = []
            if incompatible.missing_keys:
                problems.append(f"missing in the checkpoint: {incompatible.missing_keys[:10]}")
            if incompatible.unexpected_keys:
                problems.append(f"not in the model: {incompatible.unexpected_keys[:10]}")
            if incompatible.incorrect_shapes:
                shapes = [f"{k}: {a} vs model {b}" for k, a, b in incompatible.incorrect_shapes]
                problems.append(f"shape mismatch: {shapes[:10]}")
            if problems:
                raise ValueError(
                    "checkpoint keys don't match the model (" + "; ".join(problems) + "). "
                    + self.hint)
        return incompatible


def _create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """``create_ddp_model`` that also works on CPU (gloo), where DDP needs ``device_ids=None``."""
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


def lsj_augmentations(cfg: CfgNode) -> List[T.Augmentation]:
    """Large-scale jitter as in ViTDet: flip, random resize of a square target, fixed-size crop."""
    size = cfg.INPUT.LSJ.IMAGE_SIZE
    return [
        T.RandomFlip(horizontal=True),
        T.ResizeScale(
            min_scale=cfg.INPUT.LSJ.MIN_SCALE,
            max_scale=cfg.INPUT.LSJ.MAX_SCALE,
            target_height=size,
            target_width=size,
        ),
        T.FixedSizeCrop(crop_size=(size, size), pad=False),
    ]


class Trainer(DefaultTrainer):
    """DefaultTrainer with the ViTDet recipe's optimiser and data, and COCO evaluation."""

    def __init__(self, cfg: CfgNode):
        checkpointer = partial(Checkpointer, strict=cfg.MODEL.WEIGHTS_STRICT)
        with mock.patch.object(d2_defaults, "create_ddp_model", _create_ddp_model), mock.patch.object(
            d2_defaults, "DetectionCheckpointer", checkpointer
        ):
            super().__init__(cfg)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        if cfg.SOLVER.OPTIMIZER == "SGD":
            return super().build_optimizer(cfg, model)
        if cfg.SOLVER.OPTIMIZER != "ADAMW":
            raise ValueError(
                f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r} is not supported; use 'ADAMW' or 'SGD'"
            )
        lr_factor = None
        if cfg.SOLVER.LR_DECAY_RATE != 1.0:
            lr_factor = partial(
                get_vit_lr_decay_rate,
                lr_decay_rate=cfg.SOLVER.LR_DECAY_RATE,
                num_layers=cfg.MODEL.VIT.DEPTH,
            )
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            lr_factor_func=lr_factor,
            overrides={"pos_embed": {"weight_decay": 0.0}},
        )
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
            params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS),
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        if cfg.INPUT.LSJ.ENABLED:
            mapper = CheckedDatasetMapper(
                cfg, is_train=True, augmentations=lsj_augmentations(cfg),
                recompute_boxes=cfg.MODEL.MASK_ON,
            )
        else:
            mapper = CheckedDatasetMapper(cfg, is_train=True)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # use_fast_impl=False: pycocotools' COCOeval (Detectron2's fast one needs its C++ _C).
        return COCOEvaluator(
            dataset_name,
            output_dir=output_folder,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            use_fast_impl=False,
        )


def build_eval_model(cfg: CfgNode, resume: bool = False) -> torch.nn.Module:
    """The model of a yacs config with ``MODEL.WEIGHTS`` loaded (strictly, unless
    ``MODEL.WEIGHTS_STRICT`` is off), as ``tools/train_net.py --eval-only`` evaluates it; with
    ``resume``, ``OUTPUT_DIR``'s last checkpoint instead when there is one."""
    model = Trainer.build_model(cfg)
    Checkpointer(model, save_dir=cfg.OUTPUT_DIR, strict=cfg.MODEL.WEIGHTS_STRICT
                 ).resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    return model


def load_config(config_file: str, opts: List[str] | None = None) -> CfgNode:
    """A frozen config from defaults + atc_det keys + ``config_file`` + ``KEY VALUE`` overrides.

    Raises a KeyError naming the key for an unknown key; falls back to CPU (with a warning)
    when CUDA is requested but not available, and disables AMP on CPU.
    """
    cfg = get_cfg()
    add_atc_det_config(cfg)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file!r} not found")
    for source, merge in ((config_file, lambda: cfg.merge_from_file(config_file)),
                          ("command-line overrides", lambda: cfg.merge_from_list(opts or []))):
        try:
            merge()
        except (KeyError, AssertionError) as e:  # yacs: KeyError from files, assert from lists
            raise KeyError(
                f"unknown config key: {e.args[0]} (from {source}); valid keys are Detectron2's "
                "(detectron2/config/defaults.py) and atc_det's (atc_det/config.py)"
            ) from None
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: using cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        logger.warning("SOLVER.AMP.ENABLED is not supported on cpu: training in float32")
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    return cfg


def check_weights(weights: str, key: str = "MODEL.WEIGHTS") -> None:
    """Raise FileNotFoundError if ``weights`` (the config's ``key``) names a local file that does
    not exist; URLs and other path-manager prefixes (``detectron2://``) are not checked offline."""
    path = weights.partition("?")[0]  # Detectron2 drops a query such as ?matching_heuristics=True
    if path and "://" not in path and not PathManager.isfile(path):
        raise FileNotFoundError(
            f"{key} {path!r} is not a file: give a checkpoint (.pth, or a Detectron2 .pkl), "
            "a URL, or an empty string for random weights"
        )


@contextmanager
def exit_on_bad_input() -> Iterator[None]:
    """For command-line tools: a KeyError, OSError, TypeError or ValueError raised inside (a bad
    config key or value, file, model) is printed as one ``error: ...`` line on stderr and exits
    with status 2, without a traceback."""
    try:
        yield
    except (KeyError, OSError, TypeError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def setup(args) -> CfgNode:
    """Config + logging + dataset registration, in every process of ``tools/train_net.py``.

    The launching process has already generated missing toy data (``prepare_datasets``).
    """
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    prepare_datasets(list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN)))
    return cfg
