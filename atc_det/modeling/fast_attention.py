"""The dense peer (:mod:`atc_det.sdpa_peer`: SDPA attention with ViTDet's decomposed relative
positions as its mask) in a built Detectron2 ``ViT``."""
from __future__ import annotations

from detectron2.modeling.backbone.vit import Attention, ViT

from atc_det.sdpa_peer import FastAttention, patch_attention, unpatch_attention

__all__ = ["FastAttention", "apply_fast_attention", "remove_fast_attention"]


def apply_fast_attention(vit: ViT) -> ViT:
    """Make every block of a built Detectron2 ``ViT`` use :class:`FastAttention` (in place)."""
    if not isinstance(vit, ViT):
        raise TypeError(f"apply_fast_attention needs a detectron2.modeling.ViT, got {type(vit).__name__}")
    patch_attention(vit.blocks, Attention)
    return vit


def remove_fast_attention(vit: ViT) -> ViT:
    """Undo :func:`apply_fast_attention` in place."""
    unpatch_attention(vit.blocks)
    return vit
