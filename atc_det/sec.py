"""Semantic Equitable Clustering (SEC, Fan et al. 2024, arXiv 2405.13337) as pure tensor functions.

SEC groups the N tokens of one attention head in a single pass: rank the tokens by the cosine
similarity of their key to the mean key, then cut the ranking into ``G`` consecutive, equal-size
groups and attend within each group.

Group layout: ``S = ceil(N / G)`` slots per group and ``P = G * S - N`` padding slots (``P < G``).
The last ``P`` groups hold ``S - 1`` tokens and one padding slot, so group sizes differ by at most
one (as ``torch.tensor_split`` of the ranking). A permutation ``perm [..., G, S]`` holds token
indexes, with ``N`` at padding slots; padding keys are masked out of the attention.

No Detectron2 import here: these functions serve the ViTDet patch and the SecViT backbone alike.
"""
import math
from typing import Iterable, Optional

import torch
import torch.nn.functional as F


def num_groups_for_size(num_tokens: int, group_size: int) -> int:
    """Fewest groups of at most ``group_size`` tokens that hold ``num_tokens`` tokens."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return max(1, math.ceil(num_tokens / group_size))


def balanced_slots(num_tokens: int, num_groups: int, device=None) -> torch.Tensor:
    """Rank (in the SEC order) of the token held by each slot, ``num_tokens`` at padding slots.

    Returns:
        slots: [G, S] long, S = ceil(N / G); groups of S - 1 tokens come last.
    """
    if not 1 <= num_groups <= num_tokens:
        raise ValueError(
            f"num_groups must be in [1, number of tokens = {num_tokens}], got {num_groups}: "
            "use fewer SEC groups or a larger input"
        )
    size = math.ceil(num_tokens / num_groups)
    num_short = num_groups * size - num_tokens
    full = torch.arange((num_groups - num_short) * size, device=device).view(-1, size)
    short = torch.arange(num_short * (size - 1), device=device).view(num_short, size - 1)
    short = torch.cat(
        [short + full.numel(), torch.full((num_short, 1), num_tokens, device=device)], dim=1
    )
    return torch.cat([full, short], dim=0)


def cosine_order(keys: torch.Tensor) -> torch.Tensor:
    """Token indexes sorted by ascending cosine similarity of each key to the mean key.

    Args:
        keys: [..., N, d]
    Returns:
        order: [..., N] long
    """
    center = F.normalize(keys.mean(dim=-2, keepdim=True), dim=-1)
    similarity = (F.normalize(keys, dim=-1) * center).sum(dim=-1)
    return torch.argsort(similarity, dim=-1, stable=True)


def sec_group_indices(keys: torch.Tensor, num_groups: int) -> torch.Tensor:
    """SEC grouping of tokens by their keys.

    Args:
        keys: [..., N, d] (e.g. [B, heads, N, d]; each head is grouped on its own)
        num_groups: G in [1, N]; G = 1 keeps the token order (one group holds every token).
    Returns:
        perm: [..., G, S] long token indexes, N at padding slots.
    """
    num_tokens = keys.shape[-2]
    slots = balanced_slots(num_tokens, num_groups, device=keys.device)
    if num_groups == 1:
        order = torch.arange(num_tokens, device=keys.device).expand(*keys.shape[:-1])
    else:
        order = cosine_order(keys)
    pad = order.new_full((*order.shape[:-1], 1), num_tokens)
    return torch.cat([order, pad], dim=-1)[..., slots]


def gather_groups(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Tokens of each group; padding slots get token N - 1 (they must be masked or dropped).

    Args:
        x: [..., N, d]
        perm: [..., G, S] from :func:`sec_group_indices`
    Returns:
        [..., G, S, d]
    """
    num_groups, size = perm.shape[-2:]
    index = perm.clamp(max=x.shape[-2] - 1).flatten(-2)
    index = index.unsqueeze(-1).expand(*index.shape, x.shape[-1])
    return x.gather(-2, index).unflatten(-2, (num_groups, size))


def scatter_groups(x_groups: torch.Tensor, perm: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Inverse of :func:`gather_groups`: put each slot back at its token, drop padding slots.

    Args:
        x_groups: [..., G, S, d]
        perm: [..., G, S]
    Returns:
        [..., N, d]
    """
    values = x_groups.flatten(-3, -2)
    index = perm.flatten(-2).unsqueeze(-1).expand_as(values)
    out = values.new_zeros(*values.shape[:-2], num_tokens + 1, values.shape[-1])
    return out.scatter(-2, index, values)[..., :num_tokens, :]


def pair_bias(query_table: torch.Tensor, key_coord: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Bias of each (query, key) pair of a group read from a per-query table.

    Args:
        query_table: [..., N, R] bias of query n towards keys at coordinate r (e.g. a key row)
        key_coord: [N] long coordinate of each token, in [0, R)
        perm: [..., G, S]
    Returns:
        bias: [..., G, S, S] with bias[..., g, i, j] = query_table[perm[g, i], key_coord[perm[g, j]]]
    """
    rows = gather_groups(query_table, perm)
    coords = key_coord[perm.clamp(max=key_coord.numel() - 1)]
    return rows.gather(-1, coords.unsqueeze(-2).expand(*coords.shape, coords.shape[-1]))


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Softmax attention inside each SEC group; padding keys are masked.

    Args:
        q: [..., N, d] queries, already multiplied by the attention scale
        k, v: [..., N, d]
        perm: [..., G, S] from :func:`sec_group_indices`
        bias: optional [..., G, S, S] added to the logits (e.g. relative positions)
    Returns:
        [..., N, d] attention output in the original token order
    """
    num_tokens = q.shape[-2]
    q_g, k_g, v_g = (gather_groups(t, perm) for t in (q, k, v))
    logits = q_g @ k_g.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    if perm.shape[-2] * perm.shape[-1] != num_tokens:
        is_pad = (perm == num_tokens).unsqueeze(-2)
        logits = logits.masked_fill(is_pad, float("-inf"))
    return scatter_groups(logits.softmax(dim=-1) @ v_g, perm, num_tokens)


def check_sec_arguments(depth: int, blocks: Optional[Iterable[int]], global_groups: int,
                        windowed: bool = True, key: str = "") -> list[int]:
    """The block indexes to patch (all for None); one ValueError for a bad argument, naming the
    config key under ``key`` (e.g. "MODEL.SEC.")."""
    if not isinstance(windowed, bool):
        raise ValueError(f"{key}{'WINDOWED' if key else 'windowed'} must be True or False, got "
                         f"{windowed!r}")
    if isinstance(global_groups, bool) or not isinstance(global_groups, int) or global_groups < 1:
        raise ValueError(f"{key}{'GLOBAL_GROUPS' if key else 'global_groups'} must be an int >= 1 "
                         f"(number of SEC groups), got {global_groups!r}")
    indexes = list(range(depth)) if blocks is None else list(blocks)
    bad = [i for i in indexes if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
    if bad or len(set(indexes)) != len(indexes):
        raise ValueError(f"{key}{'BLOCKS' if key else 'blocks'} must hold distinct int ViT block "
                         f"indexes in [0, {depth}), got {indexes!r}")
    return indexes
