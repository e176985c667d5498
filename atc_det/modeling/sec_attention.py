"""SEC attention in a built Detectron2 ``ViT`` (ViTDet), patched in place: the Detectron2 side of
:mod:`atc_det.vitdet_sec` (one :class:`~atc_det.vitdet_sec.SecAttention` mixin for Detectron2's
and SAM's ``Attention``), plus the ``MODEL.SEC.*`` config keys.

``apply_sec`` swaps the class of chosen blocks' ``attn`` (parameter names and state-dict keys
unchanged, so ViTDet checkpoints load as they are) and sets ``block.window_size = 0``;
``remove_sec`` restores both.
"""
from typing import Iterable, Optional

from detectron2.config import CfgNode
from detectron2.modeling import ViT
from detectron2.modeling.backbone.vit import Block

from atc_det.sec import check_sec_arguments
from atc_det.vitdet_sec import (  # noqa: F401  (re-exported for Detectron2 users)
    REL_POS_MODES,
    SecAttention,
    apply_sec_blocks,
    rel_pos_at_offsets,
    remove_sec_blocks,
)


def apply_sec(
    vit: ViT,
    blocks: Optional[Iterable[int]] = None,
    *,
    global_groups: int = 4,
    windowed: bool = True,
    windowed_rel_pos: str = "clamp",
) -> ViT:
    """Patch SEC attention into a built Detectron2 ``ViT`` in place (and return it).

    Args:
        vit: Detectron2 ``ViT``.
        blocks: indexes of the blocks to patch (None: all).
        global_groups: G >= 1 SEC groups in global blocks (1: they keep global attention).
        windowed: replace the window partition of windowed blocks by SEC groups of at most
            ``window_size ** 2`` tokens (False: windowed blocks keep window attention).
        windowed_rel_pos: "clamp" or "resize", rel-pos tables of windowed blocks
            (:mod:`atc_det.vitdet_sec`).
    :func:`remove_sec` undoes it.
    """
    if not isinstance(vit, ViT):
        raise TypeError(f"apply_sec needs a detectron2.modeling.ViT, got {type(vit).__name__}")
    apply_sec_blocks(vit.blocks, Block, blocks, global_groups=global_groups, windowed=windowed,
                     windowed_rel_pos=windowed_rel_pos)
    return vit


def remove_sec(vit: ViT) -> ViT:
    """Undo :func:`apply_sec` in place: each block gets its Detectron2 attention and window back."""
    remove_sec_blocks(vit.blocks, Block)
    return vit


def sec_arguments_from_cfg(cfg: CfgNode, depth: int) -> dict:
    """:func:`apply_sec` keyword arguments from ``MODEL.SEC.*`` (empty BLOCKS: all), checked."""
    sec = cfg.MODEL.SEC
    blocks = list(sec.BLOCKS) or None
    check_sec_arguments(depth, blocks, sec.GLOBAL_GROUPS, sec.WINDOWED, key="MODEL.SEC.")
    return dict(blocks=blocks, global_groups=sec.GLOBAL_GROUPS, windowed=sec.WINDOWED)


def apply_sec_from_cfg(vit: ViT, cfg: CfgNode) -> ViT:
    """``apply_sec`` with ``MODEL.SEC.{WINDOWED, GLOBAL_GROUPS, BLOCKS}`` (empty BLOCKS: all)."""
    return apply_sec(vit, **sec_arguments_from_cfg(cfg, len(vit.blocks)))
