"""Baseline token clustering methods under the ATC interface (the ATC paper's comparison set).

Written from the papers, same call shape as ATC:
``fn(metric [B, N, C], num_clusters, *, valid=None, protected=0) -> [B, N] int64 labels``, with
the same rules: cosine distance, exactly K clusters per sample (K counts protected singletons and
clusters of invalid tokens too), valid and invalid tokens never share a cluster, the first
``protected`` tokens stay singletons, labels numbered by first member.
"""

from __future__ import annotations

import torch
from torch import Tensor

from atc_det.clustering import (
    check_tokens,
    cosine_distances,
    relabel_by_first_member,
    token_groups,
)


def _group_distances(metric: Tensor, valid: Tensor | None, protected: int) -> tuple[Tensor, Tensor]:
    """Cosine distances [B, N, N] with +inf between groups, and the group ids [B, N]."""
    groups = token_groups(metric.shape[0], metric.shape[1], valid, protected, metric.device)
    dist = cosine_distances(metric.float() if metric.dtype in (torch.float16, torch.bfloat16) else metric)
    return dist.masked_fill(groups[:, :, None] != groups[:, None, :], float("inf")), groups


def _group_leaders(groups: Tensor, score: Tensor) -> Tensor:
    """Mask [B, N] of the highest-``score`` token of every group (ties: lowest index)."""
    num_groups = int(groups.max()) + 1
    best = torch.full((groups.shape[0], num_groups), -float("inf"), dtype=score.dtype, device=score.device)
    best = best.scatter_reduce(1, groups, score, "amax")
    is_best = score == best.gather(1, groups)
    index = torch.arange(groups.shape[1], device=groups.device).expand_as(groups)
    first = torch.full_like(best, groups.shape[1], dtype=torch.long).scatter_reduce(
        1, groups, torch.where(is_best, index, groups.shape[1]), "amin")
    return first.gather(1, groups) == index


def _top_centres(priority: Tensor, forced: Tensor, num_clusters: int) -> Tensor:
    """Mask [B, N]: the ``forced`` tokens plus the highest-``priority`` others, K in all."""
    order = torch.sort(torch.where(forced, float("inf"), priority.float()), dim=-1, descending=True,
                       stable=True).indices
    return torch.zeros_like(forced).scatter_(1, order[:, :num_clusters], True)


def _assign_to_centres(dist: Tensor, is_centre: Tensor) -> Tensor:
    """Each token joins its nearest centre (ties: lowest index), a centre itself -> labels [B, N]."""
    index = torch.arange(dist.shape[-1], device=dist.device)
    nearest = dist.masked_fill(~is_centre[:, None, :], float("inf")).argmin(-1)
    return relabel_by_first_member(torch.where(is_centre, index, nearest))


def tome_clustering(metric: Tensor, num_clusters: int, *, valid: Tensor | None = None,
                    protected: int = 0) -> Tensor:
    """ToMe bipartite soft matching (Bolya et al., ICLR 2023), repeated until K tokens remain.

    Each step splits every group's current tokens alternately into sets A and B (by order of
    first member), links each A token to its most cosine-similar B token, and merges the ``r``
    most similar links (r = tokens above K, at most |A|). Merged tokens are size-weighted means.
    """
    check_tokens(metric, num_clusters, valid, protected)
    batch, num_tokens, _ = metric.shape
    device = metric.device
    groups = token_groups(batch, num_tokens, valid, protected, device)
    feats = metric.float() if metric.dtype in (torch.float16, torch.bfloat16) else metric
    size = torch.ones(batch, num_tokens, dtype=feats.dtype, device=device)
    real = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
    assign = torch.arange(num_tokens, device=device).repeat(batch, 1)  # token -> current position
    while True:
        excess = real.sum(-1) - num_clusters
        if not bool((excess > 0).any()):
            break
        n = feats.shape[1]
        rank_in_group = torch.zeros_like(groups)
        for g in (0, 1):
            member = (groups == g) & real
            rank_in_group = torch.where(member, member.long().cumsum(-1) - 1, rank_in_group)
        mergeable = real & (groups < 2)
        is_a = mergeable & (rank_in_group % 2 == 0)
        is_b = mergeable & (rank_in_group % 2 == 1)
        unit = torch.nn.functional.normalize(feats, dim=-1)
        allowed = is_a[:, :, None] & is_b[:, None, :] & (groups[:, :, None] == groups[:, None, :])
        similarity = (unit @ unit.mT).masked_fill(~allowed, -float("inf"))
        best, match = similarity.max(-1)
        linked = best > -float("inf")
        num_merges = torch.minimum(excess.clamp_min(0), linked.sum(-1))
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices
        position = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand_as(order))
        merged = linked & (position < num_merges[:, None])
        index = torch.arange(n, device=device)
        target = torch.where(merged, match, index)
        survivor = real & ~merged
        new_position = (survivor.long().cumsum(-1) - 1).gather(1, target)
        m = int(survivor.sum(-1).max())
        slots = torch.where(real, new_position, m)  # padding goes to a discarded slot m
        weight = size * real
        new_size = size.new_zeros(batch, m + 1).scatter_add(1, slots, weight)
        new_feats = feats.new_zeros(batch, m + 1, feats.shape[-1]).scatter_add(
            1, slots[..., None].expand_as(feats), feats * weight[..., None])
        new_groups = groups.new_zeros(batch, m + 1).scatter(1, slots, groups)
        feats = new_feats[:, :m] / new_size[:, :m, None].clamp_min(1)
        size, groups = new_size[:, :m], new_groups[:, :m]
        real = torch.arange(m, device=device) < survivor.sum(-1, keepdim=True)
        size = torch.where(real, size, 1)
        assign = new_position.gather(1, assign)
    return relabel_by_first_member(assign)


def kmedoids_clustering(metric: Tensor, num_clusters: int, *, valid: Tensor | None = None,
                        protected: int = 0, max_iter: int = 50) -> Tensor:
    """K-Medoids: greedy PAM BUILD initialisation, then alternating (Voronoi) iterations.

    BUILD starts from one medoid per group (its token with the least total distance, protected
    tokens are always medoids) and adds the token that lowers the total distance to the nearest
    medoid the most (ties: lowest index) until K. Each iteration assigns every token to its
    nearest medoid and moves each medoid to the member with the least total distance to its
    cluster, until nothing changes or ``max_iter``. Deterministic.
    """
    check_tokens(metric, num_clusters, valid, protected)
    dist, groups = _group_distances(metric, valid, protected)
    finite = torch.where(torch.isinf(dist), 0, dist)
    is_medoid = _group_leaders(groups, -finite.sum(-1))
    nearest = torch.where(is_medoid[:, None, :], dist, float("inf")).amin(-1)
    for _ in range(num_clusters - int(is_medoid.sum(-1).min())):
        gain = (nearest[:, None, :] - dist).clamp_min(0).sum(-1)  # candidate (row) -> total gain
        need = is_medoid.sum(-1) < num_clusters
        gain = gain.masked_fill(is_medoid, -float("inf"))
        pick = gain.argmax(-1)
        is_medoid = is_medoid | (torch.zeros_like(is_medoid).scatter_(1, pick[:, None], True) & need[:, None])
        chosen = dist.gather(1, pick[:, None, None].expand(-1, 1, dist.shape[-1]))[:, 0]
        nearest = torch.where(need[:, None], torch.minimum(nearest, chosen), nearest)
    labels = _assign_to_centres(dist, is_medoid)
    for _ in range(max_iter):
        same = labels[:, :, None] == labels[:, None, :]
        cost = torch.where(same, finite, 0).sum(-1)  # total distance to own cluster
        best = torch.full_like(cost, float("inf")).scatter_reduce(1, labels, cost, "amin")
        index = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
        leader = torch.full_like(labels, labels.shape[1]).scatter_reduce(
            1, labels, torch.where(cost == best.gather(1, labels), index, labels.shape[1]), "amin")
        new_medoid = leader.gather(1, labels) == index
        if torch.equal(new_medoid, is_medoid):
            break
        is_medoid = new_medoid
        labels = _assign_to_centres(dist, is_medoid)
    return labels


def dpcknn_clustering(metric: Tensor, num_clusters: int, *, valid: Tensor | None = None,
                      protected: int = 0, k_neighbors: int = 5) -> Tensor:
    """DPC-KNN (Du et al., 2016; as in TCFormer): density peaks with k-nearest-neighbour density.

    density = exp(-mean squared distance to the ``k_neighbors`` nearest tokens of the group);
    delta = distance to the nearest token of higher density (ties: the lower index counts as
    higher), for a group's densest token its largest distance in the group; the K tokens with
    the largest density * delta are centres (always including the best of every group, so each
    protected token is one), and every token joins its nearest centre.
    """
    check_tokens(metric, num_clusters, valid, protected)
    if not isinstance(k_neighbors, int) or k_neighbors < 1:
        raise ValueError(f"k_neighbors must be a positive int, got {k_neighbors!r}")
    dist, groups = _group_distances(metric, valid, protected)
    num_tokens = dist.shape[-1]
    index = torch.arange(num_tokens, device=dist.device)
    off_diagonal = dist.masked_fill(index[:, None] == index[None, :], float("inf"))
    knn = off_diagonal.topk(min(k_neighbors, max(num_tokens - 1, 1)), dim=-1, largest=False).values
    knn_finite = torch.isfinite(knn)
    mean_sq = torch.where(knn_finite, knn**2, 0).sum(-1) / knn_finite.sum(-1).clamp_min(1)
    density = torch.exp(-mean_sq)
    higher = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (index[None, :] < index[:, None]))
    delta = off_diagonal.masked_fill(~higher, float("inf")).amin(-1)
    largest = torch.where(torch.isfinite(off_diagonal), off_diagonal, 0).amax(-1)
    delta = torch.where(torch.isinf(delta), largest, delta)
    score = density * delta
    is_centre = _top_centres(score, _group_leaders(groups, score), num_clusters)
    return _assign_to_centres(dist, is_centre)


def random_clustering(metric: Tensor, num_clusters: int, *, valid: Tensor | None = None,
                      protected: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """Random partition: K random centres (one per group forced), members join a random centre."""
    check_tokens(metric, num_clusters, valid, protected)
    batch, num_tokens, _ = metric.shape
    groups = token_groups(batch, num_tokens, valid, protected, metric.device)
    noise = torch.rand(batch, num_tokens, generator=generator, device=metric.device)
    is_centre = _top_centres(noise, _group_leaders(groups, noise), num_clusters)
    pick = torch.rand(batch, num_tokens, num_tokens, generator=generator, device=metric.device)
    same_group = groups[:, :, None] == groups[:, None, :]
    choice = pick.masked_fill(~(same_group & is_centre[:, None, :]), -1.0).argmax(-1)
    index = torch.arange(num_tokens, device=metric.device)
    return relabel_by_first_member(torch.where(is_centre, index, choice))
