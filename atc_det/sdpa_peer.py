"""The fastest dense ViTDet attention a user can run, for Detectron2's ViT and SAM's image
encoder: PyTorch's ``scaled_dot_product_attention`` with ViTDet's decomposed relative positions
given as its additive mask (the fallback path of segment-anything-fast). Speedups of the reduced
models are quoted against this dense peer. Framework-free: :class:`FastAttention` is a mixin
over a ViTDet ``Attention`` (``qkv``, ``proj``, ``num_heads``, ``scale``, ``use_rel_pos``,
``rel_pos_h`` / ``rel_pos_w``), put in place with :mod:`atc_det.patching` (same parameters and
names, so checkpoints load as they are); the outputs equal the stock attention's up to rounding.
ATC blocks run their own cluster attention either way."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atc_det.patching import swap_class, unswap_class
from atc_det.vitdet_block import resized_rel_pos_table

__all__ = ["FastAttention", "decomposed_rel_pos_bias", "patch_attention", "unpatch_attention"]


def decomposed_rel_pos_bias(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor,
                            size: tuple[int, int]) -> Tensor:
    """ViTDet's decomposed relative-position logits as an additive mask.

    q [B, L, D] (unscaled queries, L = H * W), tables [2S - 1, D] -> [B, L, L]: entry (i, j) is
    q_i . R_h(h_i - h_j) + q_i . R_w(w_i - w_j), Detectron2's ``add_decomposed_rel_pos`` term.
    """
    height, width = size
    r_q = q.reshape(q.shape[0], height, width, -1)
    lattice = []
    for table, length in ((rel_pos_h, height), (rel_pos_w, width)):
        lines = torch.arange(length, device=q.device)
        lattice.append(resized_rel_pos_table(table, length)[lines[:, None] - lines[None, :] + length - 1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, lattice[0])
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, lattice[1])
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return bias.reshape(q.shape[0], height * width, height * width)


class FastAttention:
    """Mixin for a ViTDet ``Attention``: computed by ``F.scaled_dot_product_attention``."""

    def forward(self, x: Tensor) -> Tensor:
        """x [B, H, W, C] -> [B, H, W, C]."""
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (H, W)).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(out)


def patch_attention(encoder_blocks: nn.ModuleList, attention_type: type) -> None:
    """Put :class:`FastAttention` over the ``attention_type`` attention of every block."""
    for index, block in enumerate(encoder_blocks):
        if type(block.attn) is not attention_type and not isinstance(block.attn, FastAttention):
            raise TypeError(f"blocks[{index}].attn is a {type(block.attn).__name__}, not the "
                            f"{attention_type.__module__}.{attention_type.__name__} it replaces "
                            "(remove_sec first)")
        swap_class(block.attn, FastAttention, "FastAttention")


def unpatch_attention(encoder_blocks: nn.ModuleList) -> None:
    """Undo :func:`patch_attention` in place."""
    for block in encoder_blocks:
        unswap_class(block.attn, FastAttention)
