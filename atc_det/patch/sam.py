"""Token clustering (ATC and baselines) in Segment Anything's image encoder
(``segment_anything.modeling.image_encoder.ImageEncoderViT``): the same reduced block as
Detectron2's ViTDet (:mod:`atc_det.vitdet_block`), since SAM's encoder is a ViTDet ViT (14x14
windows, global blocks, decomposed relative positions, the same ``Block`` and ``Attention``).
No parameter is added or renamed: official ``sam_vit_{b,l,h}`` checkpoints load unchanged, and
``SamPredictor`` / ``SamAutomaticMaskGenerator`` run on a reduced encoder as they are. SEC
attention (:func:`apply_sec_sam`) is Detectron2's too (:mod:`atc_det.vitdet_sec`)."""

from __future__ import annotations

from typing import Iterable, Sequence

from segment_anything.modeling.image_encoder import Attention, Block, ImageEncoderViT

from atc_det.patching import check_not_combined, has_sec
from atc_det.sdpa_peer import patch_attention, unpatch_attention
from atc_det.vitdet_block import apply_reduction, remove_reduction
from atc_det.vitdet_sec import apply_sec_blocks, remove_sec_blocks

__all__ = ["apply_atc_sam", "apply_fast_attention_sam", "apply_sec_sam", "remove_atc_sam",
           "remove_fast_attention_sam", "remove_sec_sam"]


def _check_encoder(encoder: ImageEncoderViT, name: str) -> None:
    if not isinstance(encoder, ImageEncoderViT):
        raise TypeError(f"{name} needs a segment_anything ImageEncoderViT (sam.image_encoder), "
                        f"got {type(encoder).__name__}")


def apply_atc_sam(encoder: ImageEncoderViT, keep_rate: float | Sequence[float] = 0.5,
                  linkage: str = "average", blocks: Sequence[int] | None = None, *,
                  mode: str = "dense", scope: str = "window", **options) -> ImageEncoderViT:
    """Make selected blocks of SAM's image encoder cluster their tokens (in place; again: new
    settings). The arguments and defaults are those of Detectron2's ViT
    (:func:`atc_det.modeling.atc_vit.apply_atc`): dense mode, window scope, centroid relative
    positions, all blocks but the first. Returns ``encoder``; :func:`remove_atc_sam` undoes it."""
    _check_encoder(encoder, "apply_atc_sam")
    check_not_combined("atc", False, has_sec(encoder.blocks))
    apply_reduction(encoder, Block, keep_rate, linkage, blocks, mode=mode, scope=scope, **options)
    return encoder


def remove_atc_sam(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Undo :func:`apply_atc_sam` in place."""
    remove_reduction(encoder, Block)
    return encoder


def apply_fast_attention_sam(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """The dense peer: every attention of SAM's image encoder through SDPA
    (:class:`atc_det.sdpa_peer.FastAttention`), in place; reduced blocks keep their own."""
    _check_encoder(encoder, "apply_fast_attention_sam")
    patch_attention(encoder.blocks, Attention)
    return encoder


def remove_fast_attention_sam(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Undo :func:`apply_fast_attention_sam` in place."""
    unpatch_attention(encoder.blocks)
    return encoder


def apply_sec_sam(encoder: ImageEncoderViT, blocks: Iterable[int] | None = None, *,
                  global_groups: int = 4, windowed: bool = True,
                  windowed_rel_pos: str = "clamp") -> ImageEncoderViT:
    """SEC attention in the chosen blocks of SAM's image encoder (None: all), in place: the
    arguments and meanings of Detectron2's :func:`atc_det.modeling.sec_attention.apply_sec`
    (SEC groups of at most ``window_size ** 2`` tokens in windowed blocks if ``windowed``,
    ``global_groups`` groups in global blocks). Returns ``encoder``; :func:`remove_sec_sam`
    undoes it."""
    _check_encoder(encoder, "apply_sec_sam")
    apply_sec_blocks(encoder.blocks, Block, blocks, global_groups=global_groups, windowed=windowed,
                     windowed_rel_pos=windowed_rel_pos)
    return encoder


def remove_sec_sam(encoder: ImageEncoderViT) -> ImageEncoderViT:
    """Undo :func:`apply_sec_sam` in place (attention classes and window sizes restored)."""
    remove_sec_blocks(encoder.blocks, Block)
    return encoder
