"""One entry point for every framework: ``apply_atc`` / ``remove_atc`` and ``apply_sec`` /
``remove_sec`` take a Detectron2 ``ViT``, Segment Anything's ``ImageEncoderViT`` or a timm
``VisionTransformer`` with the same arguments and meanings (:mod:`atc_det.reduction`) and call
that framework's adapter: :mod:`atc_det.modeling` (Detectron2), :mod:`atc_det.patch.sam` or
:mod:`atc_det.patch.timm`. Neither framework is imported
until a model of it is given.
"""

from __future__ import annotations

import sys
from typing import Sequence

from torch import nn


def _framework(model: nn.Module) -> str:
    """"detectron2", "sam" or "timm"; one TypeError for any other model."""
    if "detectron2" in sys.modules:
        from detectron2.modeling import ViT

        if isinstance(model, ViT):
            return "detectron2"
    if "segment_anything" in sys.modules:
        from segment_anything.modeling.image_encoder import ImageEncoderViT

        if isinstance(model, ImageEncoderViT):
            return "sam"
    if "timm" in sys.modules:
        from timm.models.vision_transformer import VisionTransformer

        if isinstance(model, VisionTransformer):
            return "timm"
    raise TypeError(
        f"atc_det needs a Detectron2 ViT (detectron2.modeling.ViT, e.g. model.backbone.net of a "
        f"ViTDet model), Segment Anything's ImageEncoderViT (sam.image_encoder) or a timm "
        f"VisionTransformer, got {type(model).__name__}")


def apply_atc(
    model: nn.Module,
    keep_rate: float | Sequence[float] = 0.5,
    linkage: str = "average",
    blocks: Sequence[int] | None = None,
    *,
    method: str = "atc",
    metric: str = "keys",
    prop_attn: bool = True,
    mode: str | None = None,
    threshold: float | None = None,
    **options,
) -> nn.Module:
    """Token clustering in the chosen blocks of ``model``, in place (again: new settings).

    Args:
        model: a Detectron2 ``ViT``, SAM's ``ImageEncoderViT`` or a timm ``VisionTransformer``.
        keep_rate: fraction of each reduction's input tokens kept (``int(keep_rate * T)``
            clusters), in (0, 1]; one value or one per block.
        linkage: "single", "complete" or "average" (method "atc").
        blocks: reduction block indexes (default: Detectron2 all but the first; timm 3, 6, 9 of
            12 blocks).
        method: a name of :mod:`atc_det.registry` ("atc", "tome", "kmedoids", "dpcknn",
            "random", or one you registered).
        metric: "keys" (attention keys of the block's normalised input, heads averaged) or
            "input" (the normalised input).
        prop_attn: add log(cluster size) to the attention logits.
        mode: "dense" (updates scattered back to the members; default for Detectron2 and SAM) or
            "merge" (tokens stay merged; default for timm).
        threshold: dynamic ATC stopping instead of the keep rate.
        options: ``cluster_blocks`` (label reuse, dense mode), ``scope`` ("window": cluster
            each 14x14 window of the patch grid, the default for Detectron2; "image": the whole
            image, the default for timm), Detectron2's and SAM's ``rel_pos`` and ``real_area``
            (the keep rate counted over each image's unpadded area), and clustering-method
            options (e.g. ``k_neighbors``, ``generator``).
    Returns ``model``; :func:`remove_atc` undoes it.
    """
    arguments = dict(method=method, metric=metric, prop_attn=prop_attn, threshold=threshold,
                     **options)
    framework = _framework(model)
    if framework == "detectron2":
        from atc_det.modeling import apply_atc as apply

        return apply(model, keep_rate, linkage, blocks, mode=mode or "dense", **arguments)
    if framework == "sam":
        from atc_det.patch.sam import apply_atc_sam

        return apply_atc_sam(model, keep_rate, linkage, blocks, mode=mode or "dense", **arguments)
    from atc_det.patch.timm import apply_atc_timm

    if "rel_pos" in options:
        raise ValueError("rel_pos applies to Detectron2 ViTs (decomposed relative positions); a "
                         "timm VisionTransformer has none: drop rel_pos=")
    if "real_area" in options:
        raise ValueError("real_area applies to Detectron2's ViT and SAM's image encoder, whose inputs "
                         "are padded; a timm VisionTransformer has no padding: drop real_area=")
    return apply_atc_timm(model, keep_rate, linkage, blocks, mode=mode or "merge", **arguments)


def remove_atc(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_atc` in place (a model without ATC is returned unchanged)."""
    framework = _framework(model)
    if framework == "detectron2":
        from atc_det.modeling import remove_atc as remove

        return remove(model)
    if framework == "sam":
        from atc_det.patch.sam import remove_atc_sam

        return remove_atc_sam(model)
    from atc_det.patch.timm import remove_atc_timm

    return remove_atc_timm(model)


def apply_sec(model: nn.Module, blocks: Sequence[int] | None = None, *, global_groups: int = 4,
              **options) -> nn.Module:
    """SEC attention in the chosen blocks of ``model`` (None: all), in place.

    Args:
        model: a Detectron2 ``ViT``, SAM's ``ImageEncoderViT`` or a timm ``VisionTransformer``.
        global_groups: SEC groups in each global-attention block (1: left global). Every block
            of a timm ViT attends globally.
        options: Detectron2 and SAM only: ``windowed`` (SEC groups of the window's size replace
            the windows of windowed blocks) and ``windowed_rel_pos``.
    Returns ``model``; :func:`remove_sec` undoes it.
    """
    framework = _framework(model)
    if framework == "detectron2":
        from atc_det.modeling import apply_sec as apply

        return apply(model, blocks, global_groups=global_groups, **options)
    if framework == "sam":
        from atc_det.patch.sam import apply_sec_sam

        return apply_sec_sam(model, blocks, global_groups=global_groups, **options)
    from atc_det.patch.timm import apply_sec_timm

    if options:
        raise ValueError(f"{sorted(options)} apply to Detectron2 ViTs and SAM's encoder (windowed "
                         f"blocks); a timm VisionTransformer has none")
    return apply_sec_timm(model, blocks, global_groups=global_groups)


def remove_sec(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_sec` in place."""
    framework = _framework(model)
    if framework == "detectron2":
        from atc_det.modeling import remove_sec as remove

        return remove(model)
    if framework == "sam":
        from atc_det.patch.sam import remove_sec_sam

        return remove_sec_sam(model)
    from atc_det.patch.timm import remove_sec_timm

    return remove_sec_timm(model)
