"""The fastest dense ViTDet attention a user can run: PyTorch's ``scaled_dot_product_attention``
with ViTDet's decomposed relative positions given as its additive mask (the fallback path of
segment-anything-fast). Speedups of the reduced models are quoted against this dense peer.

``apply_fast_attention(vit)`` puts the :class:`FastAttention` mixin over every ``Attention`` of a
built Detectron2 ``ViT`` (:mod:`atc_det.patching`: same parameters and names, so checkpoints load
as they are); the
outputs equal Detectron2's up to rounding. ATC blocks run their own cluster attention either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detectron2.modeling.backbone.utils import get_rel_pos
from detectron2.modeling.backbone.vit import Attention, ViT

from atc_det.patching import swap_class, unswap_class

__all__ = ["FastAttention", "apply_fast_attention", "remove_fast_attention"]


def decomposed_rel_pos_bias(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor,
                            size: tuple[int, int]) -> Tensor:
    """ViTDet's decomposed relative-position logits as an additive mask.

    q [B, L, D] (unscaled queries, L = H * W), tables [2S - 1, D] -> [B, L, L]: entry (i, j) is
    q_i . R_h(h_i - h_j) + q_i . R_w(w_i - w_j), Detectron2's ``add_decomposed_rel_pos`` term.
    """
    height, width = size
    r_q = q.reshape(q.shape[0], height, width, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(height, height, rel_pos_h))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(width, width, rel_pos_w))
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return bias.reshape(q.shape[0], height * width, height * width)


class FastAttention:
    """Mixin for Detectron2's ViT ``Attention``: computed by ``F.scaled_dot_product_attention``."""

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (H, W)).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(out)


def apply_fast_attention(vit: ViT) -> ViT:
    """Make every block of a built Detectron2 ``ViT`` use :class:`FastAttention` (in place)."""
    if not isinstance(vit, ViT):
        raise TypeError(f"apply_fast_attention needs a detectron2.modeling.ViT, got {type(vit).__name__}")
    for index, block in enumerate(vit.blocks):
        if type(block.attn) is not Attention and not isinstance(block.attn, FastAttention):
            raise TypeError(f"vit.blocks[{index}].attn is a {type(block.attn).__name__}, not "
                            "Detectron2's Attention (remove_sec first)")
        swap_class(block.attn, FastAttention, "FastAttention")
    return vit


def remove_fast_attention(vit: ViT) -> ViT:
    """Undo :func:`apply_fast_attention` in place."""
    for block in vit.blocks:
        unswap_class(block.attn, FastAttention)
    return vit
