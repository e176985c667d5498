"""Token clustering (ATC and baselines) in Segment Anything's image encoder
(``segment_anything.modeling.image_encoder.ImageEncoderViT``): the same reduced block as
Detectron2's ViTDet (:mod:`atc_det.vitdet_block`), since SAM's encoder is a ViTDet ViT (14x14
windows, global blocks, decomposed relative positions, the same ``Block`` and ``Attention``).
No parameter is added or renamed: official ``sam_vit_{b,l,h}`` checkpoints load unchanged, and
``SamPredictor`` / ``SamAutomaticMaskGenerator`` run on a reduced encoder as they are."""

from __future__ import annotations

from typing import Sequence

from segment_anything.modeling.image_encoder import Attention, Block, ImageEncoderViT

from atc_det.sdpa_peer import patch_attention, unpatch_attention
from atc_det.vitdet_block import apply_reduction, remove_reduction

__all__ = ["apply_atc_sam", "apply_fast_attention_sam", "remove_atc_sam", "remove_fast_attention_sam"]


def apply_atc_sam(encoder: ImageEncoderViT, keep_rate: float | Sequence[float] = 0.5,
                  linkage: str = "average", blocks: Sequence[int] | None = None, *,
                  mode: str = "dense", scope: str = "window", **options) -> ImageEncoderViT:
    """Make selected blocks of SAM's image encoder cluster their tokens (in place; again: new
    settings). The arguments and defaults are those of Detectron2's ViT
    (:func:`atc_det.modeling.atc_vit.apply_atc`): dense mode, window scope, centroid relative
    positions, all blocks but the first. Returns ``encoder``; :func:`remove_atc_sam` undoes it."""
    if not isinstance(encoder, ImageEncoderViT):
        raise TypeError(f"apply_atc_sam needs a segment_anything ImageEncoderViT (sam.image_encoder), "
                        f"got {type(encoder).__name__}")
    apply_reduction(encoder.blocks, Block, keep_rate, linkage, blocks, mode=mode, scope=scope, **options)
    return encoder


def remove_atc_sam(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Undo :func:`apply_atc_sam` in place."""
    remove_reduction(encoder.blocks, Block)
    return encoder


def apply_fast_attention_sam(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """The dense peer: every attention of SAM's image encoder through SDPA
    (:class:`atc_det.sdpa_peer.FastAttention`), in place; reduced blocks keep their own."""
    if not isinstance(encoder, ImageEncoderViT):
        raise TypeError(f"apply_fast_attention_sam needs a segment_anything ImageEncoderViT, got "
                        f"{type(encoder).__name__}")
    patch_attention(encoder.blocks, Attention)
    return encoder


def remove_fast_attention_sam(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Undo :func:`apply_fast_attention_sam` in place."""
    unpatch_attention(encoder.blocks)
    return encoder
