"""ATC in Detectron2's LazyConfig files: the ViTDet backbone's ``net`` node with token clustering.

An official recipe's ``model.backbone.net`` is ``L(ViT)(...)``. :func:`with_atc` turns it into
``L(atc_vit)(..., atc={...})``: the same ViT arguments (so ``model.backbone.in_feature``'s
``${.net.out_feature}`` and overrides such as ``model.backbone.net.depth=24`` keep working), plus
an ``atc`` dict holding every argument of :func:`atc_det.modeling.apply_atc` (its defaults filled
in, so ``model.backbone.net.atc.keep_rate=0.25`` is an override of an existing key)::

    model.backbone.net = with_atc(model.backbone.net, keep_rate=0.5, linkage="average")

``instantiate`` then builds Detectron2's ``ViT`` and applies ATC to it: parameter names are
Detectron2's, so official checkpoints load unchanged.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterator, Mapping

from detectron2.config import LazyCall
from detectron2.modeling import ViT
from omegaconf import DictConfig, OmegaConf

from atc_det.vitdet_block import check_atc_arguments

from .atc_vit import apply_atc

_VIT_DEPTH = inspect.signature(ViT).parameters["depth"].default

__all__ = ["atc_arguments", "atc_vit", "atc_vit_nodes", "check_atc_nodes", "with_atc"]


def atc_arguments(**arguments: Any) -> dict[str, Any]:
    """Every keyword argument of :func:`apply_atc` after ``vit``: its default, or the value given.
    A clustering method's own options (e.g. ``k_neighbors``) are kept when given here; they are
    not filled in, so a command-line override cannot add one."""
    parameters = list(inspect.signature(apply_atc).parameters.values())[1:]
    defaults = {p.name: p.default for p in parameters if p.kind is not p.VAR_KEYWORD}
    return {**defaults, **arguments}


def atc_vit(*, atc: Mapping[str, Any], **vit_arguments: Any) -> ViT:
    """``ViT(**vit_arguments)`` with :func:`apply_atc` ``(vit, **atc)`` applied (LazyCall-able)."""
    if OmegaConf.is_config(atc):
        atc = OmegaConf.to_container(atc)
    return apply_atc(ViT(**vit_arguments), **atc)


# What atc_vit takes, for the override checks of tools/train_net.py: ``atc`` and ViT's arguments.
atc_vit.__signature__ = inspect.Signature(
    [inspect.Parameter("atc", inspect.Parameter.KEYWORD_ONLY)]
    + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(ViT).parameters.values()])


def with_atc(net: DictConfig, **arguments: Any) -> DictConfig:
    """A LazyConfig ``L(ViT)(...)`` node -> ``L(atc_vit)(..., atc=...)`` with the same ViT
    arguments and :func:`atc_arguments` ``(**arguments)``; ``net`` itself is not changed."""
    target = net.get("_target_") if isinstance(net, (DictConfig, dict)) else None
    if target not in (ViT, atc_vit) and target != f"{ViT.__module__}.{ViT.__qualname__}":
        raise TypeError(f"with_atc needs the LazyCall node of a detectron2.modeling.ViT "
                        f"(model.backbone.net of a ViTDet config), got target {target!r}")
    vit_arguments = {k: v for k, v in OmegaConf.to_container(net).items()
                     if k not in ("_target_", "atc")}
    return LazyCall(atc_vit)(**vit_arguments, atc=atc_arguments(**arguments))


def atc_vit_nodes(cfg: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """(dotted path, node) of every ``L(atc_vit)`` node in a LazyConfig."""
    if isinstance(cfg, DictConfig):
        if cfg.get("_target_") in (atc_vit, f"{__name__}.atc_vit"):
            yield path, cfg
        for key in cfg.keys():
            yield from atc_vit_nodes(cfg[key], f"{path}.{key}" if path else str(key))
    elif OmegaConf.is_list(cfg):
        for index, item in enumerate(cfg):
            yield from atc_vit_nodes(item, f"{path}.{index}")


def check_atc_nodes(cfg: Any, path: str = "") -> None:
    """Raise one ValueError naming the node for bad ATC arguments in any ``L(atc_vit)`` node,
    without building a model (``tools/train_net.py`` calls it before starting workers)."""
    own = atc_arguments()  # apply_atc's own arguments; a method's options are not checked here
    for where, node in atc_vit_nodes(cfg, path):
        arguments = {k: v for k, v in OmegaConf.to_container(node.atc).items() if k in own}
        try:
            check_atc_arguments(node.get("depth", _VIT_DEPTH), **arguments)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}.atc: {error}") from None
