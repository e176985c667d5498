"""Clustering groups of a patch grid: square windows (ViTDet's 14x14 attention windows) or the
whole image, and an input's real (unpadded) area. Pure tensor functions, no Detectron2 or timm:
every adapter (the ViTDet-style block of :mod:`atc_det.vitdet_block` for Detectron2 and SAM,
timm's ``VisionTransformer`` in :mod:`atc_det.patch.timm`) splits a [B, H, W, C] map into the
same groups with these.

Window order and padding are Detectron2's (``window_partition``: the map is zero padded at the
bottom and right to a multiple of the window size, windows in row-major order).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def coordinate_grid(height: int, width: int, like: Tensor) -> Tensor:
    """(row, col) of every position of a height x width grid: [height, width, 2]."""
    rows = torch.arange(height, device=like.device, dtype=like.dtype)
    cols = torch.arange(width, device=like.device, dtype=like.dtype)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)


def padded_size(hw: tuple[int, int], window_size: int) -> tuple[int, int]:
    """(H, W) rounded up to a multiple of ``window_size`` (0: unchanged)."""
    if window_size == 0:
        return hw
    return -(-hw[0] // window_size) * window_size, -(-hw[1] // window_size) * window_size


def split_windows(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """[B, H, W, C] -> windows [B * nW, window_size, window_size, C] (zero padded at the bottom
    and right, row-major window order) and the padded size (Hp, Wp)."""
    batch, height, width, channels = x.shape
    padded = padded_size((height, width), window_size)
    x = F.pad(x, (0, 0, 0, padded[1] - width, 0, padded[0] - height))
    rows, cols = padded[0] // window_size, padded[1] // window_size
    x = x.reshape(batch, rows, window_size, cols, window_size, channels).transpose(2, 3)
    return x.reshape(-1, window_size, window_size, channels), (padded[0], padded[1])


def merge_windows(windows: Tensor, window_size: int, pad_hw: tuple[int, int],
                  hw: tuple[int, int]) -> Tensor:
    """Inverse of :func:`split_windows`: [B * nW, ws, ws, C] -> [B, H, W, C] (padding dropped)."""
    (padded_h, padded_w), (height, width) = pad_hw, hw
    rows, cols = padded_h // window_size, padded_w // window_size
    x = windows.reshape(-1, rows, cols, window_size, window_size, windows.shape[-1]).transpose(2, 3)
    return x.reshape(-1, padded_h, padded_w, windows.shape[-1])[:, :height, :width]


def group_tokens(x: Tensor, window_size: int) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
    """Split a [B, H, W, C] map into windows of ``window_size`` x ``window_size`` tokens.

    Returns tokens [B * nW, S, C] (S = window_size**2, zero padded as in Detectron2), ``valid``
    [B * nW, S] (False on padding), image coordinates (row, col) [B * nW, S, 2] and the padded
    size (Hp, Wp). ``window_size`` 0 means one group per image (no padding).
    """
    B, H, W, C = x.shape
    if window_size == 0:
        valid = torch.ones(B, H * W, dtype=torch.bool, device=x.device)
        coords = coordinate_grid(H, W, x).reshape(1, H * W, 2).expand(B, -1, -1)
        return x.reshape(B, H * W, C), valid, coords, (H, W)
    S = window_size * window_size
    tokens, (Hp, Wp) = split_windows(x, window_size)
    # Padded positions continue the grid (windowed rel-pos sees them, as in Detectron2).
    grid = torch.cat([coordinate_grid(Hp, Wp, x), x.new_zeros(Hp, Wp, 1)], -1)
    grid[:H, :W, 2] = 1
    grid, _ = split_windows(grid[None], window_size)
    num_windows = grid.shape[0]
    grid = grid.reshape(1, num_windows, S, 3).expand(B, -1, -1, -1).reshape(B * num_windows, S, 3)
    return tokens.reshape(-1, S, C), grid[..., 2] > 0, grid[..., :2], (Hp, Wp)


def ungroup_tokens(
    tokens: Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> Tensor:
    """Inverse of :func:`group_tokens`: [B * nW, S, C] -> [B, H, W, C] (padding dropped)."""
    H, W = hw
    C = tokens.shape[-1]
    if window_size == 0:
        return tokens.reshape(-1, H, W, C)
    windows = tokens.reshape(-1, window_size, window_size, C)
    return merge_windows(windows, window_size, pad_hw, hw)


def window_real_counts(height: int, width: int, window_size: int) -> list[int]:
    """Real (unpadded) tokens of each group of :func:`group_tokens` for one image, from the shape
    alone (host ints, in Detectron2's window order); ``window_size`` 0: one group."""
    if window_size == 0:
        return [height * width]
    rows = [min(window_size, height - r) for r in range(0, height, window_size)]
    cols = [min(window_size, width - c) for c in range(0, width, window_size)]
    return [r * c for r in rows for c in cols]


def window_slot_starts(counts: Sequence[int], groups_per_image: int, offset: int = 0
                       ) -> tuple[list[int], list[int]]:
    """Image-level cluster ids for per-group labels: each image numbers its groups' clusters one
    after another from ``offset``. ``counts``: the label range of each group [G] (host ints,
    images one after another). Returns the first id of each group [G] and the ids each image
    uses [B] (``offset`` + its groups' counts)."""
    starts, totals = [], []
    for image in range(0, len(counts), groups_per_image):
        ends = list(itertools.accumulate(counts[image:image + groups_per_image], initial=offset))
        starts += ends[:-1]
        totals.append(ends[-1])
    return starts, totals


def image_cluster_ids(labels: Tensor, counts: Sequence[int], window_size: int,
                      hw: tuple[int, int], offset: int = 0) -> tuple[Tensor, list[int]]:
    """Per-group labels [B * nW, S] of :func:`group_tokens`' groups of a [B, H, W] grid as
    image-level ids [B, H, W] (padding dropped): each image numbers its groups' label ranges
    ``counts`` [B * nW] (host ints) one after another from ``offset``. Also returns the ids each
    image uses [B] (host ints). No synchronisation with the device."""
    groups_per_image = len(window_real_counts(*hw, window_size))
    starts, totals = window_slot_starts(counts, groups_per_image, offset)
    first = torch.tensor(starts).to(labels.device, non_blocking=True)
    ids = ungroup_tokens((labels + first[:, None])[..., None], window_size, padded_size(hw, window_size), hw)
    return ids[..., 0], totals


def real_patch_extent(images: Tensor, patch_size: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """Each image's real area in patches, from the zero padding at its bottom and right (what
    SAM's ``preprocess`` and Detectron2's ``ImageList`` add after normalising): images
    [B, C, H, W] -> ((rows, cols), ...) per image, the patches up to its last non-zero pixel row
    and column (at least 1 x 1). One read to the host."""
    nonzero = images.ne(0).any(1)  # [B, H, W]
    extents = []
    for lines, dim in ((nonzero.any(2), 2), (nonzero.any(1), 3)):
        index = torch.arange(1, images.shape[dim] + 1, device=images.device)
        extents.append((lines * index).amax(1))  # last non-zero line, 1-based; 0 if none
    rows, cols = torch.stack(extents).tolist()
    return tuple((max(1, -(-r // patch_size[0])), max(1, -(-c // patch_size[1]))) for r, c in zip(rows, cols))


class RealAreaGroups(NamedTuple):
    """Where each image's real area falls in :func:`group_tokens`' groups [G, S] of its grid:
    ``inside`` [G, S] (in the real area) and ``split_window_padding`` [G, S] (the window padding
    of a group that also holds input padding), both on the device; per group (host data) its
    tokens inside, whether it holds input padding, and whether both paddings."""

    inside: Tensor
    split_window_padding: Tensor
    inside_counts: list[int]
    has_input_padding: list[bool]
    has_both_paddings: list[bool]


@functools.lru_cache(maxsize=32)
def real_area_groups(real_hw: tuple[tuple[int, int], ...], hw: tuple[int, int], window_size: int,
                     device: torch.device) -> RealAreaGroups:
    """:class:`RealAreaGroups` of the real areas ``real_hw`` [B] ((rows, cols) from the top left)
    of a [B, H, W] grid, built on the CPU once per areas, grid, window size and device (cached:
    every reduced block of a forward, and every input of the same areas, reuses it)."""
    inside = torch.zeros(len(real_hw), *hw, 1)
    for image, (rows, cols) in enumerate(real_hw):
        inside[image, :rows, :cols] = 1
    grouped, in_grid, _, _ = group_tokens(inside, window_size)
    inside = grouped[..., 0] > 0
    has_input_padding = (in_grid & ~inside).any(1)
    has_both = has_input_padding & ~in_grid.all(1)
    return RealAreaGroups(inside.to(device), (~in_grid & has_both[:, None]).to(device),
                          inside.sum(1).tolist(), has_input_padding.tolist(), has_both.tolist())
