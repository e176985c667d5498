"""Detectron2 LazyConfig (``.py`` config) training and evaluation, as Detectron2's
``tools/lazyconfig_train_net.py`` runs them, with this project's checks and checkpoints.

``tools/train_net.py --config-file X.py [--eval-only] [--resume] key=value ...`` lands here. The
config holds ``model``, ``dataloader.{train,test,evaluator}``, ``optimizer``, ``lr_multiplier``
and ``train`` (Detectron2's ``configs/common/train.py``: ``output_dir``, ``init_checkpoint``,
``max_iter``, ``amp.enabled``, ``ddp``, ``checkpointer``, ``eval_period``, ``log_period``,
``device``; optionally ``seed``). Differences from Detectron2's script, all about bad input and
this machine: an override must name an existing key (or an argument of the LazyCall target it
sets) and keep the value's type; missing datasets, weights files and bad ATC arguments stop with
one error before any worker starts; weights load strictly (as the yacs route); checkpoints are
written atomically; ``cuda`` falls back to the CPU (AMP off) with a warning; evaluation uses
pycocotools when Detectron2 has no compiled ``_C``; DDP works on CPU (gloo).
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from typing import Any

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig, ListConfig, OmegaConf

from .data.datasets import prepare_datasets
from .engine import Checkpointer, _create_ddp_model, check_weights, exit_on_bad_input
from .modeling.lazy import check_atc_nodes

logger = logging.getLogger("detectron2")  # the logger default_setup writes to log.txt

REQUIRED = {"train": ("model", "dataloader", "optimizer", "lr_multiplier", "train"),
            "eval": ("model", "dataloader", "train")}


def _target_accepts(node: DictConfig, name: str) -> bool:
    """Whether the LazyCall ``node``'s target takes a keyword argument ``name``."""
    target = node.get("_target_")
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        target = locate(target)
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def _checked_value(cfg: DictConfig, key: str, value: Any) -> Any:
    """The value an override ``key=value`` sets, checked against ``cfg``: a KeyError for a key
    that is not in ``cfg`` (a new argument of a LazyCall node is allowed when its target takes
    it), a ValueError when a bool, int or float in the config would get another type (an int
    key takes an integral float such as 1e5, as an int; a float key takes an int)."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
            continue
        if (depth == len(parts) - 1 and isinstance(node, DictConfig) and "_target_" in node
                and _target_accepts(node, part)):
            return value
        raise KeyError(f"unknown config key: {key} (from command-line overrides; "
                       f"{'.'.join(parts[:depth]) or 'the config'} has no {part!r}); the config's "
                       "keys are in its file and those it imports")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(node, bool):
        ok = isinstance(value, bool)
    elif isinstance(node, int):
        ok = is_number and float(value).is_integer()
        value = int(value) if ok else value
    elif isinstance(node, float):
        ok = is_number
    else:
        ok = True
    if not ok:
        raise ValueError(f"type mismatch for {key}: the config has {node!r} "
                         f"({type(node).__name__}), the override gives {value!r} "
                         f"({type(value).__name__})")
    return value


def load_lazy_config(config_file: str, overrides: list[str] | None = None) -> DictConfig:
    """A LazyConfig file with ``key=value`` overrides applied and checked (see the module
    docstring); raises FileNotFoundError, KeyError or ValueError with one clear message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file!r} not found")
    cfg = LazyConfig.load(config_file)
    overrides = list(overrides or [])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"override {bad[0]!r} is not key=value: a LazyConfig (.py) takes "
                         "overrides such as train.max_iter=100 (KEY VALUE pairs are for .yaml)")
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise ValueError(f"cannot parse the overrides: {error}") from None
    for override in parsed:
        if override.is_delete():
            raise ValueError(f"cannot delete {override.key_or_group} from the command line: "
                             "edit the config file")
        key = override.key_or_group
        OmegaConf.update(cfg, key, _checked_value(cfg, key, override.value()), merge=True)
    for group in REQUIRED["eval"]:
        if group not in cfg:
            raise KeyError(f"{config_file} defines no {group!r}: a LazyConfig for training and "
                           f"evaluation defines {', '.join(REQUIRED['train'])}")
    train = cfg.train
    if str(train.device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("train.device=%s but CUDA is not available: using cpu", train.device)
        train.device = "cpu"
    if train.device == "cpu" and train.amp.enabled:
        logger.warning("train.amp.enabled is not supported on cpu: training in float32")
        train.amp.enabled = False
    evaluator = cfg.dataloader.get("evaluator")
    if evaluator is not None and evaluator.get("_target_") in (COCOEvaluator, "detectron2.evaluation.COCOEvaluator"):
        if importlib.util.find_spec("detectron2._C") is None:
            evaluator.use_fast_impl = False  # Detectron2's fast COCOeval needs its compiled _C
        if evaluator.get("output_dir") is None:
            evaluator.output_dir = os.path.join(
                train.output_dir, "inference", "${.dataset_name}")
    return cfg


def dataset_names(cfg: DictConfig, eval_only: bool) -> list[str]:
    """The dataset names of ``dataloader.test`` (and ``dataloader.train`` unless eval_only)."""
    names: list[str] = []
    for split in ("test",) if eval_only else ("test", "train"):
        value = OmegaConf.select(cfg, f"dataloader.{split}.dataset.names", default=None)
        if value is not None:
            names += [value] if isinstance(value, str) else list(value)
    return names


def check_lazy_inputs(cfg: DictConfig, eval_only: bool, resume: bool) -> None:
    """The config's groups, data, weights and ATC arguments, once in the launching process."""
    if not eval_only:
        missing = [g for g in REQUIRED["train"] if g not in cfg]
        if missing:
            raise KeyError(f"the config defines no {missing[0]!r}, which training needs")
    check_atc_nodes(cfg.model, "model")
    last = os.path.join(cfg.train.output_dir, "last_checkpoint")
    if not (resume and os.path.exists(last)):
        check_weights(cfg.train.init_checkpoint, key="train.init_checkpoint")
    prepare_datasets(dataset_names(cfg, eval_only))


def do_test(cfg: DictConfig, model: torch.nn.Module) -> dict | None:
    """COCO-style evaluation of ``model`` on ``dataloader.test`` with ``dataloader.evaluator``."""
    if "evaluator" not in cfg.dataloader:
        return None
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def build_lazy_model(cfg: DictConfig) -> torch.nn.Module:
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    return model.to(cfg.train.device)


def build_lazy_eval_model(cfg: DictConfig, resume: bool = False) -> torch.nn.Module:
    """The model of a LazyConfig with ``train.init_checkpoint`` loaded strictly, as
    ``tools/train_net.py --eval-only`` evaluates it; with ``resume``, ``train.output_dir``'s last
    checkpoint instead when there is one."""
    model = build_lazy_model(cfg)
    Checkpointer(model, save_dir=cfg.train.output_dir, hint=Checkpointer.LAZY_HINT).resume_or_load(
        cfg.train.init_checkpoint, resume=resume)
    return model


def do_train(cfg: DictConfig, resume: bool) -> dict | None:
    """Detectron2's LazyConfig training loop: (AMP)SimpleTrainer with LR schedule, atomic
    periodic checkpoints, evaluation every ``train.eval_period`` and after training, writers.
    Returns the last evaluation's results."""
    with exit_on_bad_input():  # e.g. a bad argument of a LazyCall node
        model = build_lazy_model(cfg)
        cfg.optimizer.params.model = model
        optimizer = instantiate(cfg.optimizer)
        train_loader = instantiate(cfg.dataloader.train)
        model = _create_ddp_model(model, **cfg.train.ddp)
        trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
        checkpointer = Checkpointer(model, cfg.train.output_dir, trainer=trainer,
                                    hint=Checkpointer.LAZY_HINT)
    results: list[dict | None] = [None]

    def test_and_keep() -> dict | None:
        results[0] = do_test(cfg, model)
        return results[0]

    main = comm.is_main_process()
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
        hooks.EvalHook(cfg.train.eval_period, test_and_keep),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if main else None,
    ])
    with exit_on_bad_input():  # e.g. a checkpoint whose keys don't match the model
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)  # after the hooks: their state
    # The checkpoint stores the iteration that finished: go on from the next one.
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return results[0]


def lazy_main(args) -> dict | None:
    """One process of ``tools/train_net.py`` for a ``.py`` config."""
    cfg = load_lazy_config(args.config_file, args.opts)
    default_setup(cfg, args)
    prepare_datasets(dataset_names(cfg, args.eval_only))
    if not args.eval_only:
        return do_train(cfg, args.resume)
    with exit_on_bad_input():
        model = _create_ddp_model(build_lazy_eval_model(cfg, resume=args.resume))
    return do_test(cfg, model)
