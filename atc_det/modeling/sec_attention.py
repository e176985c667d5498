"""SEC attention in a built Detectron2 ``ViT`` (ViTDet), patched in place.

``apply_sec`` swaps the ``attn`` module of chosen blocks for :class:`SecAttention`, which reuses
the block's own ``qkv``, ``proj``, ``rel_pos_h`` and ``rel_pos_w`` (parameter names and state dict
keys are unchanged, so ViTDet checkpoints load as they are), and sets ``block.window_size = 0`` so
the block hands the whole ``[B, H, W, C]`` map to the attention:

- windowed blocks: SEC groups of at most ``window_size ** 2`` tokens replace the window partition;
- global blocks: SEC splits the image into ``global_groups`` groups (1: left as global attention).

Relative positions: grouped tokens come from anywhere in the image, so each query ``i`` gets the
decomposed bias ``q_i . Rh[row_i - row_j] + q_i . Rw[col_i - col_j]`` of ViTDet for every key ``j``
of its group, computed once on the full grid and gathered per group. The tables Rh, Rw at offsets
``-(H-1) .. H-1`` come from the block's ``rel_pos_h`` / ``rel_pos_w``:

- ``"resize"``: Detectron2's ``get_rel_pos`` (linear interpolation of the table to ``2H - 1``
  entries when its length differs), exactly what Detectron2's global attention does;
- ``"clamp"``: offsets beyond the table's range use its end entries; offsets inside the range get
  the learned entries unchanged (what a window's table was trained for).

Global blocks use ``"resize"`` (so G = 1 equals Detectron2's attention); windowed blocks use
``windowed_rel_pos`` (default ``"clamp"``).
"""
from typing import Iterable, Optional

import torch
import torch.nn as nn
from detectron2.config import CfgNode
from detectron2.modeling import ViT
from detectron2.modeling.backbone.utils import get_rel_pos
from atc_det.patching import check_not_combined
from detectron2.modeling.backbone.vit import Attention

from ..sec import check_sec_arguments, grouped_attention, num_groups_for_size, pair_bias, sec_group_indices

REL_POS_MODES = ("clamp", "resize")


def rel_pos_at_offsets(table: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) coordinate pair along one axis.

    Args:
        table: [L, d] a ViTDet ``rel_pos_h`` or ``rel_pos_w`` table, L = 2 * trained size - 1
        size: number of rows (or columns) of the token grid
        mode: "resize" (Detectron2's ``get_rel_pos``) or "clamp" (see the module docstring)
    Returns:
        [size, size, d] with entry [a, b] for offset a - b
    """
    if mode == "resize":
        return get_rel_pos(size, size, table)
    radius = (table.shape[0] - 1) // 2
    coords = torch.arange(size, device=table.device)
    offsets = (coords[:, None] - coords[None, :]).clamp(-radius, radius)
    return table[offsets + radius]


class SecAttention(nn.Module):
    """Detectron2 ViT attention over SEC groups; takes over an ``Attention``'s parameters."""

    def __init__(
        self,
        attn: Attention,
        num_groups: int = 0,
        group_size: int = 0,
        rel_pos_mode: str = "resize",
    ):
        """
        Args:
            attn: Detectron2 ``Attention`` whose qkv / proj / rel-pos parameters are reused.
            num_groups: fixed number of groups G per image (global blocks), or 0.
            group_size: most tokens per group, G = ceil(N / group_size) (windowed blocks), or 0.
            rel_pos_mode: "resize" or "clamp", how rel-pos tables cover image-wide offsets.
        """
        super().__init__()
        if (num_groups > 0) == (group_size > 0):
            raise ValueError(
                f"give exactly one of num_groups ({num_groups}) and group_size ({group_size}) > 0"
            )
        if rel_pos_mode not in REL_POS_MODES:
            raise ValueError(f"rel_pos_mode must be one of {REL_POS_MODES}, got {rel_pos_mode!r}")
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.qkv = attn.qkv
        self.proj = attn.proj
        self.use_rel_pos = attn.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = attn.rel_pos_h
            self.rel_pos_w = attn.rel_pos_w
        self.num_groups = num_groups
        self.group_size = group_size
        self.rel_pos_mode = rel_pos_mode
        # What remove_sec restores (a tuple, so the module is not registered twice).
        self._replaced = (attn,)

    def extra_repr(self) -> str:
        groups = f"num_groups={self.num_groups}" if self.num_groups else f"group_size={self.group_size}"
        return f"{groups}, rel_pos_mode={self.rel_pos_mode!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] -> [B, H, W, C]"""
        batch, height, width, _ = x.shape
        num_tokens = height * width
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, d]
        num_groups = self.num_groups or num_groups_for_size(num_tokens, self.group_size)
        perm = sec_group_indices(k, num_groups)
        bias = self._rel_pos_bias(q, perm, height, width) if self.use_rel_pos else None
        out = grouped_attention(q * self.scale, k, v, perm, bias)
        return self.proj(out.permute(0, 2, 1, 3).reshape(batch, height, width, -1))

    def _rel_pos_bias(self, q: torch.Tensor, perm: torch.Tensor, height: int, width: int):
        """Decomposed rel-pos bias [B, heads, G, S, S] of the (query, key) pairs of each group."""
        batch, heads, num_tokens, dim = q.shape
        rel_h = rel_pos_at_offsets(self.rel_pos_h, height, self.rel_pos_mode)
        rel_w = rel_pos_at_offsets(self.rel_pos_w, width, self.rel_pos_mode)
        grid_q = q.reshape(batch * heads, height, width, dim)
        to_rows = torch.einsum("bhwc,hkc->bhwk", grid_q, rel_h).reshape(batch, heads, num_tokens, -1)
        to_cols = torch.einsum("bhwc,wkc->bhwk", grid_q, rel_w).reshape(batch, heads, num_tokens, -1)
        token = torch.arange(num_tokens, device=q.device)
        return pair_bias(to_rows, token // width, perm) + pair_bias(to_cols, token % width, perm)


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
        windowed_rel_pos: "clamp" or "resize", rel-pos tables of windowed blocks (module docstring).
    :func:`remove_sec` undoes it.
    """
    if not isinstance(vit, ViT):
        raise TypeError(f"apply_sec needs a detectron2.modeling.ViT, got {type(vit).__name__}")
    indexes = check_sec_arguments(len(vit.blocks), blocks, global_groups, windowed)
    if windowed_rel_pos not in REL_POS_MODES:
        raise ValueError(f"windowed_rel_pos must be one of {REL_POS_MODES}, got {windowed_rel_pos!r}")
    check_not_combined("sec", any(hasattr(block, "_atc") for block in vit.blocks),
                       any(isinstance(block.attn, SecAttention) for block in vit.blocks))
    for i in indexes:
        block = vit.blocks[i]
        if block.window_size > 0 and windowed:
            sec = SecAttention(block.attn, group_size=block.window_size**2, rel_pos_mode=windowed_rel_pos)
        elif block.window_size == 0 and global_groups > 1:
            sec = SecAttention(block.attn, num_groups=global_groups, rel_pos_mode="resize")
        else:
            continue
        sec._window_size = block.window_size  # what remove_sec restores
        block.attn, block.window_size = sec, 0
    return vit


def remove_sec(vit: ViT) -> ViT:
    """Undo :func:`apply_sec` in place: each block gets its Detectron2 attention and window back."""
    for block in vit.blocks:
        if isinstance(block.attn, SecAttention):
            block.window_size = block.attn._window_size
            block.attn = block.attn._replaced[0]
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
