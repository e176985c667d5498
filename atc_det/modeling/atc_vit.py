"""Token clustering (ATC and baselines) inside the blocks of Detectron2's ViTDet ``ViT``: the
Detectron2 side of :mod:`atc_det.vitdet_block` (the one reduced block of ViTDet-style encoders,
shared with Segment Anything's image encoder), plus the ``MODEL.ATC.*`` config keys."""
from __future__ import annotations

from typing import Sequence

from detectron2.modeling.backbone.vit import Block, ViT

from atc_det.patching import check_not_combined, has_sec
from atc_det.vitdet_block import (  # noqa: F401  (the reduced block, re-exported for Detectron2 users)
    ATCBlock,
    apply_reduction,
    collect_source_maps,
    remove_reduction,
    unwrapped_block,
)

__all__ = ["ATCBlock", "apply_atc", "apply_atc_from_cfg", "collect_source_maps", "remove_atc"]


def apply_atc(
    vit: ViT,
    keep_rate: float | Sequence[float] = 0.5,
    linkage: str = "average",
    blocks: Sequence[int] | None = None,
    *,
    method: str = "atc",
    metric: str = "keys",
    prop_attn: bool = True,
    mode: str = "dense",
    scope: str = "window",
    threshold: float | None = None,
    rel_pos: str = "centroid",
    cluster_blocks: Sequence[int] | None = None,
    real_area: bool = False,
    **method_options,
) -> ViT:
    """Make selected blocks of a built Detectron2 ``ViT`` cluster their tokens (in place).

    The arguments mean what they mean for every adapter (:mod:`atc_det.reduction`); here:

    Args:
        vit: ``detectron2.modeling.ViT`` (e.g. ``model.backbone.net`` of a ViTDet model).
        keep_rate: fraction of each reduction's input tokens kept as clusters, in (0, 1]; one
            value or one per block. Dense mode: of each window's real tokens.
        blocks: indexes of the reduction blocks (default: all but the first).
        mode: "dense" (default: each block's update scattered back to the members) or "merge"
            (tokens stay merged from the first reduction block on; every later block runs on the
            clusters; needs ``scope="window"``).
        scope: "window": cluster each 14x14 window (the attention window in windowed blocks);
            "image": global blocks cluster the whole image (dense mode only).
        rel_pos: relative position of a cluster for ViTDet's decomposed rel-pos: "centroid"
            (size-weighted centroid, tables linearly interpolated) or "mean" (the exact mean of
            Detectron2's term over all member pairs of the query and key clusters).
        cluster_blocks: label reuse (dense mode, window scope): the reduction blocks that
            cluster; every other reduction block reuses the partition of the last clustering
            block before it (merging its own input with those labels, its update scattered back
            to the members). None: every reduction block clusters.
        real_area: count the keep rate over each image's real area (dense mode): the zero
            padding at the bottom and right of the normalised input (ViTDet pads every image to
            a square) is found per forward (one read to the host) and each window keeps
            ``int(keep_rate * its real tokens)`` clusters plus one of its padding; see
            ``docs/sam.md``.
        method_options: passed to the clustering method (e.g. ``k_neighbors`` for "dpcknn").
    Applying again replaces the settings. Returns ``vit``, whose parameters and their names are
    unchanged (checkpoints load as they are); :func:`remove_atc` undoes it.
    """
    if not isinstance(vit, ViT):
        raise TypeError(f"apply_atc needs a detectron2.modeling.ViT, got {type(vit).__name__}")
    check_not_combined("atc", False, has_sec(vit.blocks))
    apply_reduction(vit, Block, keep_rate, linkage, blocks, method=method, metric=metric,
                    prop_attn=prop_attn, mode=mode, scope=scope, threshold=threshold, rel_pos=rel_pos,
                    cluster_blocks=cluster_blocks, real_area=real_area, **method_options)
    return vit


def remove_atc(vit: ViT) -> ViT:
    """Undo :func:`apply_atc` in place (a ViT without ATC blocks is returned unchanged)."""
    remove_reduction(vit, Block)
    return vit


def atc_arguments_from_cfg(cfg) -> dict:
    """:func:`apply_atc` keyword arguments from the ``MODEL.ATC.*`` keys of a config."""
    atc = cfg.MODEL.ATC
    keep = atc.KEEP_RATE
    return dict(
        keep_rate=list(keep) if isinstance(keep, (list, tuple)) else keep,
        linkage=atc.LINKAGE,
        blocks=list(atc.BLOCKS) or None,
        method=atc.METHOD,
        metric=atc.METRIC,
        prop_attn=atc.PROP_ATTN,
        mode=atc.MODE,
        scope=atc.SCOPE,
        threshold=None if atc.THRESHOLD < 0 else atc.THRESHOLD,
        rel_pos=atc.REL_POS,
        cluster_blocks=list(atc.CLUSTER_BLOCKS) or None,
        real_area=atc.REAL_AREA,
    )


def apply_atc_from_cfg(vit: ViT, cfg) -> ViT:
    """:func:`apply_atc` with the ``MODEL.ATC.*`` keys of a Detectron2 config (see config.py)."""
    return apply_atc(vit, **atc_arguments_from_cfg(cfg))
