"""Merge, unmerge and track tokens given cluster labels: pure functions on tensors.

``labels`` [B, N] int64 in 0..K-1 come from any method of ``atc_det.registry``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def merge_tokens(x: Tensor, labels: Tensor, num_clusters: int, size: Tensor | None = None, *,
                 check_labels: bool = True) -> tuple[Tensor, Tensor]:
    """Size-weighted mean of each cluster's members.

    Args:
        x: [B, N, C] token features.
        labels: [B, N] int64 cluster of each token, in 0..num_clusters-1.
        num_clusters: K, the number of output tokens.
        size: [B, N] how many original tokens each token already stands for (None: 1 each).
        check_labels: check that every label lies in 0..K-1 (on a GPU on the device; on the
            CPU it reads the labels' range, a host read that the reduced blocks, whose labels
            come from the clustering core, skip).

    Returns:
        [B, K, C] merged tokens and [B, K] their sizes (summed member sizes). A label that no
        token carries gives a zero token of size 0 (so its attention bias is -inf).
    """
    batch, num_tokens, channels = x.shape
    if labels.shape != (batch, num_tokens):
        raise ValueError(f"labels must have shape [B, N] = [{batch}, {num_tokens}], got {tuple(labels.shape)}")
    if check_labels and labels.numel():
        low, high = torch.aminmax(labels)
        message = f"labels must lie in 0..{num_clusters - 1} (num_clusters={num_clusters})"
        if labels.device.type == "cpu":
            if low < 0 or high >= num_clusters:
                raise ValueError(f"{message}, got labels in {int(low)}..{int(high)}")
        else:  # checked on the device: no host synchronisation in a reduced block
            torch._assert_async((low >= 0) & (high < num_clusters), message)
    weight = torch.ones(batch, num_tokens, dtype=x.dtype, device=x.device) if size is None else size.to(x.dtype)
    merged_size = x.new_zeros(batch, num_clusters).scatter_add(1, labels, weight)
    total = x.new_zeros(batch, num_clusters, channels).scatter_add(
        1, labels[..., None].expand(-1, -1, channels), x * weight[..., None])
    return total / merged_size.clamp_min(torch.finfo(x.dtype).tiny)[..., None], merged_size


def unmerge_tokens(x_merged: Tensor, labels: Tensor) -> Tensor:
    """Scatter each cluster's feature back to its members: [B, K, C], [B, N] -> [B, N, C]."""
    return x_merged.gather(1, labels[..., None].expand(-1, -1, x_merged.shape[-1]))


def compose_source(source: Tensor | None, labels: Tensor) -> Tensor:
    """Source map after one more reduction: original position -> current token index.

    Args:
        source: [B, N0] index of the current token (in 0..N-1) holding each original position,
            or None when no reduction happened yet (identity).
        labels: [B, N] cluster of each current token, from this reduction.

    Returns:
        [B, N0] cluster index (in 0..K-1) holding each original position.
    """
    return labels if source is None else labels.gather(1, source)
