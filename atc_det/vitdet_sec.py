"""SEC attention in ViTDet-style encoders: Detectron2's ``ViT`` and Segment Anything's
``ImageEncoderViT`` (the same ``Block`` and ``Attention``). Framework-free: :class:`SecAttention`
is a mixin over either framework's ``Attention`` (it reads ``qkv``, ``proj``, ``num_heads``,
``scale``, ``use_rel_pos``, ``rel_pos_h`` / ``rel_pos_w``), put in place with
:mod:`atc_det.patching` (parameters and state-dict keys unchanged, so checkpoints load as they
are). :func:`apply_sec_blocks` swaps the class of chosen blocks' ``attn`` and sets the block's
``window_size`` to 0, so the block hands the whole ``[B, H, W, C]`` map to the attention:

- windowed blocks: SEC groups of at most ``window_size ** 2`` tokens replace the window partition;
- global blocks: SEC splits the image into ``global_groups`` groups (1: left as global attention).

Relative positions: grouped tokens come from anywhere in the image, so each query ``i`` gets the
decomposed bias ``q_i . Rh[row_i - row_j] + q_i . Rw[col_i - col_j]`` of ViTDet for every key ``j``
of its group, computed once on the full grid and gathered per group. The tables Rh, Rw at offsets
``-(H-1) .. H-1`` come from the block's ``rel_pos_h`` / ``rel_pos_w``:

- ``"resize"``: the linear resize of ``get_rel_pos`` (Detectron2's and SAM's copies are the same
  code) to ``2H - 1`` entries when the table's length differs, exactly what ViTDet's global
  attention does;
- ``"clamp"``: offsets beyond the table's range use its end entries; offsets inside the range get
  the learned entries unchanged (what a window's table was trained for).

Global blocks use ``"resize"`` (so G = 1 equals the stock attention); windowed blocks use
``windowed_rel_pos`` (default ``"clamp"``).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from atc_det.patching import SecMixin, check_not_combined, has_sec, swap_class, unswap_class
from atc_det.sec import (check_sec_arguments, grouped_attention, num_groups_for_size, pair_bias,
                         sec_group_indices)
from atc_det.vitdet_block import resized_rel_pos_table, unwrapped_block

__all__ = ["REL_POS_MODES", "SecAttention", "apply_sec_blocks", "rel_pos_at_offsets", "remove_sec_blocks",
           "swap_sec_attention", "unswap_sec_attention"]

REL_POS_MODES = ("clamp", "resize")
# SecAttention's instance attributes (dropped by unswap_sec_attention).
_ATTRIBUTES = ("_sec_num_groups", "_sec_group_size", "_sec_rel_pos", "_sec_window_size")


def rel_pos_at_offsets(table: Tensor, size: int, mode: str) -> Tensor:
    """Relative-position embeddings for every (query, key) coordinate pair along one axis.

    table [L, d] (a ``rel_pos_h`` or ``rel_pos_w``, L = 2 * trained size - 1), size: rows (or
    columns) of the token grid, mode: "resize" or "clamp" -> [size, size, d], entry [a, b] for
    offset a - b.
    """
    coords = torch.arange(size, device=table.device)
    offsets = coords[:, None] - coords[None, :]
    if mode == "resize":
        return resized_rel_pos_table(table, size)[offsets + size - 1]
    radius = (table.shape[0] - 1) // 2
    return table[offsets.clamp(-radius, radius) + radius]


class SecAttention(SecMixin):
    """Mixin for a ViTDet-style ``Attention`` (Detectron2's or SAM's): attention within SEC
    groups of the whole map. Put in place by :func:`swap_sec_attention`, which sets
    ``_sec_num_groups`` (G per image, or 0), ``_sec_group_size`` (most tokens per group,
    G = ceil(N / size), or 0) and ``_sec_rel_pos`` ("resize" or "clamp");
    :func:`apply_sec_blocks` adds ``_sec_window_size`` (the block's, restored on removal)."""

    _sec_num_groups: int
    _sec_group_size: int
    _sec_rel_pos: str

    def extra_repr(self) -> str:
        groups = (f"sec_num_groups={self._sec_num_groups}" if self._sec_num_groups
                  else f"sec_group_size={self._sec_group_size}")
        return ", ".join(filter(None, [super().extra_repr(), groups, f"sec_rel_pos={self._sec_rel_pos!r}"]))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, H, W, C] -> [B, H, W, C]."""
        batch, height, width, _ = x.shape
        num_tokens = height * width
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, d]
        num_groups = self._sec_num_groups or num_groups_for_size(num_tokens, self._sec_group_size)
        perm = sec_group_indices(k, num_groups)  # [B, heads, G, S]
        bias = self._sec_bias(q, perm, height, width) if self.use_rel_pos else None
        out = grouped_attention(q * self.scale, k, v, perm, bias)
        return self.proj(out.permute(0, 2, 1, 3).reshape(batch, height, width, -1))

    def _sec_bias(self, q: Tensor, perm: Tensor, height: int, width: int) -> Tensor:
        """q [B, heads, N, d], perm [B, heads, G, S] -> decomposed rel-pos bias [B, heads, G, S, S]
        of the (query, key) pairs of each group."""
        batch, heads, num_tokens, dim = q.shape
        rel_h = rel_pos_at_offsets(self.rel_pos_h, height, self._sec_rel_pos)
        rel_w = rel_pos_at_offsets(self.rel_pos_w, width, self._sec_rel_pos)
        grid_q = q.reshape(batch * heads, height, width, dim)
        to_rows = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_h).reshape(batch, heads, num_tokens, -1)
        to_cols = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_w).reshape(batch, heads, num_tokens, -1)
        token = torch.arange(num_tokens, device=q.device)
        return pair_bias(to_rows, token // width, perm) + pair_bias(to_cols, token % width, perm)


def swap_sec_attention(attn: nn.Module, *, num_groups: int = 0, group_size: int = 0,
                       rel_pos_mode: str = "resize") -> nn.Module:
    """Make ``attn`` (a ViTDet-style ``Attention``) a :class:`SecAttention` in place, with G =
    ``num_groups`` or G = ceil(N / ``group_size``) groups (exactly one > 0); returns ``attn``."""
    if (num_groups > 0) == (group_size > 0):
        raise ValueError(f"give exactly one of num_groups ({num_groups}) and group_size ({group_size}) > 0")
    if rel_pos_mode not in REL_POS_MODES:
        raise ValueError(f"rel_pos_mode must be one of {REL_POS_MODES}, got {rel_pos_mode!r}")
    swap_class(attn, SecAttention, "SEC" + type(attn).__name__)
    attn._sec_num_groups, attn._sec_group_size, attn._sec_rel_pos = num_groups, group_size, rel_pos_mode
    return attn


def unswap_sec_attention(attn: nn.Module) -> None:
    """Undo :func:`swap_sec_attention` in place."""
    unswap_class(attn, SecAttention, _ATTRIBUTES)


def apply_sec_blocks(encoder_blocks: nn.ModuleList, block_type: type, blocks: Iterable[int] | None = None,
                     *, global_groups: int = 4, windowed: bool = True,
                     windowed_rel_pos: str = "clamp") -> None:
    """SEC attention in the chosen ``encoder_blocks`` (each a ``block_type``, possibly wrapped
    for activation checkpointing), in place; the arguments are :func:`atc_det.apply_sec`'s."""
    indexes = check_sec_arguments(len(encoder_blocks), blocks, global_groups, windowed)
    if windowed_rel_pos not in REL_POS_MODES:
        raise ValueError(f"windowed_rel_pos must be one of {REL_POS_MODES}, got {windowed_rel_pos!r}")
    check_not_combined("sec", any(hasattr(b, "_atc") for b in encoder_blocks), has_sec(encoder_blocks))
    chosen = [unwrapped_block(encoder_blocks[index], block_type)[0] for index in indexes]
    for index, block in zip(indexes, chosen):
        if block is None:
            raise TypeError(f"blocks[{index}] is a {type(encoder_blocks[index]).__name__}, not a "
                            f"{block_type.__name__} (or one wrapped for activation checkpointing)")
    for block in chosen:
        if block.window_size > 0 and windowed:
            settings = dict(group_size=block.window_size**2, rel_pos_mode=windowed_rel_pos)
        elif block.window_size == 0 and global_groups > 1:
            settings = dict(num_groups=global_groups)
        else:
            continue
        swap_sec_attention(block.attn, **settings)
        block.attn._sec_window_size = block.window_size
        block.window_size = 0


def remove_sec_blocks(encoder_blocks: nn.ModuleList, block_type: type) -> None:
    """Undo :func:`apply_sec_blocks` in place: each block gets its attention class and window size
    back (blocks without SEC are left as they are)."""
    for module in encoder_blocks:
        block = unwrapped_block(module, block_type)[0]
        if block is not None and isinstance(block.attn, SecAttention):
            block.window_size = block.attn.__dict__.get("_sec_window_size", block.window_size)
            unswap_sec_attention(block.attn)
