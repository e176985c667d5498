"""Agglomerative token clustering (ATC): exact, batched, pure functions on tensors.

The dendrogram is built with batched reciprocal-nearest-neighbour (RNN) rounds: in every round
each cluster finds its nearest neighbour, and all mutual nearest-neighbour pairs of all samples
merge at once, with Lance-Williams updates of a ``[B, n, n]`` distance matrix that is compacted
to the surviving clusters after each round. For the reducible linkages supported here (single,
complete, average) every such merge is a merge of the exact greedy dendrogram, so the result
equals SciPy's ``linkage`` + ``fcluster`` (up to relabelling and ties). Single linkage uses
Borůvka rounds instead (every cluster joins its nearest neighbour; exact spanning-tree edges),
so it needs at most ``log2 N`` rounds; the cut is Kruskal's on those edges. There is no Python loop
over merges and two host synchronisations per round (stop test, compacted size); the number of
rounds is about ``log N`` on real data and at most ``N - 1``.

Rules (both deterministic):

* Nearest neighbours: among clusters at equal distance, cluster ``i`` picks the ``j`` whose rank
  XOR ``i``'s rank is smallest (clusters ranked by first member). The rule is symmetric, so
  groups of identical tokens pair up in parallel rounds instead of one merge per round.
* Static stopping (``num_clusters=K``): the ``N - K`` lowest merges of the dendrogram are kept,
  ordered by (height, round, first member of the absorbed cluster). Merge heights are made
  monotone (a merge is never recorded lower than the merges that formed its two clusters), so
  the kept merges always form a valid partial dendrogram with exactly ``K`` clusters, also where
  SciPy's ``fcluster(criterion="maxclust")`` returns fewer because of tied heights.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from atc_det import native

LINKAGES = ("single", "complete", "average")
BACKENDS = ("auto", "torch", "native", "triton")
_warned: set[str] = set()
TRITON_MAX_TOKENS = 1024  # atc_det.triton_clustering.MAX_TOKENS (that module imports triton)
_HALF = (torch.float16, torch.bfloat16)
_NO_TIE = torch.iinfo(torch.int32).max


def _backend(backend: str, features: Tensor) -> str:
    """The backend this call runs: "torch", "native" or "triton" (see ``agglomerative_clustering``)."""
    device, num_tokens = features.device.type, features.shape[1]
    if backend == "native":
        if device != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors only, got {features.device}; "
                             f"use backend='triton', 'torch' or 'auto'")
        native.cluster_library()
    if backend != "auto":
        return backend
    if device == "cpu":
        if num_tokens > native.MAX_TOKENS:
            return "torch"
        if native.available():
            return "native"
        _warn_once("native", f"native clustering kernel unavailable, using the slower torch path on "
                             f"CPU ({native.unavailable_reason()})")
        return "torch"
    if device == "cuda" and num_tokens <= TRITON_MAX_TOKENS:
        from atc_det import triton_clustering  # imports triton: only for GPU tensors

        if triton_clustering.available():
            return "triton"
        _warn_once("triton", f"triton unavailable, using the slower torch path on the GPU "
                             f"({triton_clustering.unavailable_reason()})")
    return "torch"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"atc_det: {message}", RuntimeWarning, stacklevel=4)


def cosine_distances(metric: Tensor) -> Tensor:
    """Cosine distance ``1 - cos`` between tokens: [B, N, C] -> [B, N, N], symmetric, diagonal 0.

    Zero vectors have distance 1 to every other token.
    """
    unit = torch.nn.functional.normalize(metric, dim=-1)
    dissimilarity = (unit @ unit.mT).neg_().add_(1.0)
    dist = torch.add(dissimilarity, dissimilarity.mT).mul_(0.5).clamp_min_(0.0)  # exactly symmetric
    dist.diagonal(dim1=-2, dim2=-1).zero_()
    return dist


def _check(condition: Tensor, error: Exception) -> None:
    """Raise ``error`` unless the bool tensor ``condition`` holds; on a GPU the check runs on the
    device (an asynchronous assert with the same message), so it never synchronises."""
    if condition.device.type == "cpu":
        if not bool(condition):
            raise error
    else:
        torch._assert_async(condition, str(error))


def _check_finite(values: Tensor, name: str) -> None:
    if values.numel():
        _check(torch.isfinite(torch.stack(torch.aminmax(values))).all(), native.non_finite_error(name))


def check_tokens(metric: Tensor, num_clusters: int | Tensor | None, valid: Tensor | None,
                 protected: int, name: str = "metric", check_finite: bool = True) -> None:
    """Raise one clear error for a bad [B, N, C] ``metric``, ``valid`` mask, ``protected`` or K
    (an int or a [B] integer tensor; ``check_finite=False``: the caller checks for NaN / Inf).

    Checks that depend on the values of GPU tensors run on the device (no synchronisation); pass
    ``valid`` and a K tensor on the CPU to have them checked on the host."""
    if not isinstance(metric, Tensor) or metric.dim() != 3 or not metric.is_floating_point():
        raise TypeError(f"{name} must be a floating-point [B, N, C] tensor, got "
                        f"{type(metric).__name__} {getattr(metric, 'shape', '')}")
    if check_finite:
        _check_finite(metric, name)
    batch, num_tokens = metric.shape[:2]
    if num_tokens < 1:
        raise ValueError(f"{name} must hold at least one token per sample, got N = 0")
    if isinstance(protected, bool) or not isinstance(protected, int) or not 0 <= protected <= num_tokens:
        raise ValueError(f"protected must be an int in 0..N = 0..{num_tokens}, got {protected!r}")
    if valid is not None:
        if not isinstance(valid, Tensor) or valid.dtype != torch.bool or valid.shape != (batch, num_tokens):
            raise TypeError(f"valid must be a bool tensor of shape [B, N] = [{batch}, {num_tokens}], "
                            f"got {getattr(valid, 'dtype', type(valid).__name__)} "
                            f"{tuple(getattr(valid, 'shape', ()))}")
    if num_clusters is None:
        return
    if isinstance(num_clusters, Tensor):
        if num_clusters.dtype.is_floating_point or num_clusters.dtype in (torch.bool, torch.complex64) \
                or num_clusters.shape != (batch,):
            raise TypeError(f"num_clusters must be an int or an integer tensor of shape [B] = "
                            f"[{batch}], got {num_clusters.dtype} {tuple(num_clusters.shape)}")
    elif isinstance(num_clusters, bool) or not isinstance(num_clusters, int):
        raise TypeError(f"num_clusters must be an int or a [B] integer tensor, got "
                        f"{type(num_clusters).__name__}")
    if not batch:
        return
    fewest = min_clusters(num_tokens, valid, protected)  # [B] (or [1]), on valid's device
    rule = ("(the number of tokens N; at least 1, plus one per protected token and one for the "
            "invalid tokens of a sample)")
    if not isinstance(num_clusters, Tensor):
        if fewest.device.type == "cpu" or not num_clusters <= num_tokens:
            lowest = int(fewest.max()) if fewest.device.type == "cpu" else 1
            if not lowest <= num_clusters <= num_tokens:
                raise ValueError(f"num_clusters must lie in {lowest}..{num_tokens} {rule}, got "
                                 f"{num_clusters}")
            return
        num_clusters = torch.tensor(num_clusters)
    if fewest.device.type == "cpu" and num_clusters.device.type == "cpu":
        bad = ((num_clusters < fewest) | (num_clusters > num_tokens)).nonzero()
        if len(bad):
            sample = int(bad[0, 0])
            raise ValueError(f"num_clusters[{sample}] must lie in "
                             f"{int(fewest[sample if len(fewest) > 1 else 0])}..{num_tokens} {rule}, "
                             f"got {int(num_clusters[sample])}")
        return
    device = fewest.device if fewest.device.type != "cpu" else num_clusters.device
    fewest, num_clusters = fewest.to(device, non_blocking=True), num_clusters.to(device, non_blocking=True)
    _check(((fewest <= num_clusters) & (num_clusters <= num_tokens)).all(),
           ValueError(f"num_clusters must lie in K_min..{num_tokens} in every sample {rule}"))


def token_groups(batch: int, num_tokens: int, valid: Tensor | None, protected: int,
                 device: torch.device) -> Tensor:
    """Group id of each token, [B, N] int64: tokens may only share a cluster within one group.

    Valid tokens are group 0, invalid tokens group 1, protected token ``p`` group ``2 + p``.
    """
    groups = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
    if valid is not None:
        groups = (~valid).long()
    index = torch.arange(num_tokens, device=device)
    return torch.where(index < protected, 2 + index, groups)


def min_clusters(num_tokens: int, valid: Tensor | None, protected: int) -> Tensor:
    """Fewest clusters each sample can have, [B]: one per protected token and per other group."""
    if valid is None:
        return torch.tensor([protected + int(num_tokens > protected)])
    free = valid[:, protected:]
    return protected + free.any(-1).long() + (~free).any(-1).long()


def _pointer_jump(pointer: Tensor) -> Tensor:
    """Follow ``pointer`` [B, n] (a forest with self-loops at its roots) to each tree's root."""
    for _ in range(max(1, math.ceil(math.log2(max(pointer.shape[-1], 2))))):
        pointer = pointer.gather(-1, pointer)
    return pointer


def first_member_labels(parent: Tensor) -> Tensor:
    """Labels from a forest with ``parent[b, i] <= i``: [B, N] -> [B, N] int64 in 0..K-1.

    Clusters are numbered in the order of their first (lowest-index) member.
    """
    root = _pointer_jump(parent)
    is_root = root == torch.arange(parent.shape[-1], device=parent.device)
    return (is_root.long().cumsum(-1) - 1).gather(-1, root)


def relabel_by_first_member(labels: Tensor) -> Tensor:
    """Renumber arbitrary cluster ids [B, N] (values in 0..N-1) by each cluster's first member."""
    index = torch.arange(labels.shape[-1], device=labels.device).expand_as(labels)
    first = torch.full_like(labels, labels.shape[-1]).scatter_reduce(-1, labels, index, "amin")
    return first_member_labels(first.gather(-1, labels))


def _combine(linkage: str, a: Tensor, b: Tensor, weight_a: Tensor, weight_b: Tensor) -> Tensor:
    """Lance-Williams distance to the union of two clusters from the distances to each, in place."""
    if linkage == "single":
        return torch.minimum(a, b, out=a)
    if linkage == "complete":
        return torch.maximum(a, b, out=a)
    return a.mul_(weight_a).addcmul_(b, weight_b)


def _xor_ranks(size: int, device: torch.device) -> Tensor:
    rank = torch.arange(size, device=device, dtype=torch.int32)
    return rank[:, None] ^ rank[None, :]


def _dendrogram(dist: Tensor, linkage: str, num_merges: Tensor | None, threshold: float | None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Batched nearest-neighbour rounds on ``dist`` [B, N + 1, N + 1] (+inf: never merge, diagonal
    too; the last row and column are an all-+inf sentinel). ``dist`` is overwritten.

    Complete/average: the mutual nearest-neighbour pairs merge (RNN). Single: every cluster
    merges with its nearest neighbour (Borůvka; the edges are minimum-spanning-tree edges), so
    there are at most ``log2 N`` rounds. Returns the merge edges [B, E] in (round, rank) order:
    first member of the absorbed cluster (N: no edge), first member of the cluster it joined,
    and the height (complete/average: made monotone over the dendrogram). Stops as soon as every
    later merge would sort after the ``num_merges`` [B] lowest ones, or lie above ``threshold``.
    """
    batch, num_tokens = dist.shape[0], dist.shape[1] - 1
    device, dtype = dist.device, dist.dtype
    inf = torch.tensor(float("inf"), dtype=dtype, device=device)
    bits_dtype = torch.int32 if dtype == torch.float32 else torch.int64
    # Single/complete only take minima and maxima: on non-negative float32 values their bit
    # patterns (as int32) have the same order, and int32 reductions are faster.
    if linkage != "average" and dtype == torch.float32 and dist.numel() and bool(dist.amin() >= 0):
        dist = dist.view(bits_dtype)
    dist_inf = inf.view(dist.dtype)
    # Nearest-neighbour keys: (distance above the row minimum?) * tie_shift + rank XOR rank.
    tie_shift = 1 << num_tokens.bit_length()
    xor_ranks = _xor_ranks(num_tokens + 1, device)
    ranks = torch.arange(num_tokens + 1, device=device)
    first = ranks.expand(batch, -1)  # sentinel: N
    sample = torch.arange(batch, device=device)[:, None]
    size = torch.ones(batch, num_tokens + 1, dtype=dtype, device=device)
    own_height = torch.full((batch, num_tokens + 1), -float("inf"), dtype=dtype, device=device)
    stride = num_tokens + 1
    if linkage == "single":  # token pair (i * stride + j) realising each cluster distance
        pair_dtype = torch.int32 if stride * stride < _NO_TIE else torch.long
        pair = torch.arange(stride * stride, device=device, dtype=pair_dtype).view(1, stride, stride)
        pair, no_pair = pair.expand(batch, -1, -1), torch.iinfo(pair_dtype).max
    children, parents, heights = [], [], []
    for _ in range(num_tokens):
        n = dist.shape[-1]
        rank = ranks[:n]
        nearest_key = dist.amin(-1)  # [B, n]
        nearest_dist = nearest_key.view(dtype)
        lowest_open = nearest_dist.amin(-1, keepdim=True)  # no later merge lies below this
        if threshold is not None:
            done = lowest_open > threshold
        else:
            recorded = torch.cat(heights, 1) if heights else lowest_open.new_empty(batch, 0)
            done = (recorded <= lowest_open).sum(-1, keepdim=True) >= num_merges[:, None]
        if bool((done | torch.isinf(lowest_open)).all()):
            break
        # dist - row minimum is +0 exactly at the row's minima (NaN in all-+inf rows: all tie).
        above = torch.sub(dist, nearest_key[..., None]).view(bits_dtype).clamp_(0, 1)
        tie_key = torch.add(xor_ranks[:n, :n], above, alpha=tie_shift, out=above)
        nearest = rank ^ tie_key.amin(-1)  # sentinel / isolated rows point at themselves
        mutual = (nearest.gather(1, nearest) == rank) & (nearest != rank)
        if linkage == "single":
            edge = torch.isfinite(nearest_dist) & ~(mutual & (nearest > rank))
            merge_height = nearest_dist  # minimum-spanning-tree edge weights
        else:
            edge = mutual & (nearest < rank)
            merge_height = torch.maximum(nearest_dist, torch.maximum(own_height, own_height.gather(1, nearest)))
        if linkage == "single":  # the tokens at the two ends of the spanning-tree edge
            ends = pair.gather(2, nearest[..., None])[..., 0].long()
            child, parent = ends // stride, ends % stride
        else:
            child, parent = first, first.gather(1, nearest)
        children.append(torch.where(edge, child, num_tokens))
        parents.append(parent)
        heights.append(torch.where(edge, merge_height, inf))

        # New clusters: the trees of the edges, each kept at its lowest rank (RNN: pairs, whose
        # lower rank is never an edge's child).
        if linkage == "single":
            root = _pointer_jump(torch.where(edge, nearest, rank))
            lowest = torch.full_like(root, n).scatter_reduce(1, root, rank.expand_as(root), "amin")
            keeper = lowest.gather(1, root)
            survivor = (keeper == rank) & (first < num_tokens)
        else:
            survivor = ~edge & (first < num_tokens)
        slot = survivor.long().cumsum(-1) - 1  # new index of each survivor
        m = int(slot[:, -1].max()) + 1
        # Survivors in rank order, then the sentinel (n - 1) up to m + 1 per sample: [B, m + 1].
        keep = rank.new_full((batch, m + 2), n - 1).scatter_(
            1, torch.where(survivor, slot, m + 1), rank.expand(batch, -1))[:, :m + 1]
        if linkage == "single":
            new_index = torch.where(first < num_tokens, slot.gather(1, keeper), m)
            new_row = new_index[..., None].expand(-1, -1, n)
            rows = dist.new_full((batch, m + 1, n), dist_inf.item()).scatter_reduce_(1, new_row, dist, "amin")
            pair = pair.new_full((batch, m + 1, n), no_pair).scatter_reduce_(
                1, new_row, torch.where(dist == rows.gather(1, new_row), pair, no_pair), "amin")
            new_col = new_index[:, None, :].expand(-1, m + 1, -1)
            dist = dist.new_full((batch, m + 1, m + 1), dist_inf.item()).scatter_reduce_(2, new_col, rows, "amin")
            pair = pair.new_full((batch, m + 1, m + 1), no_pair).scatter_reduce_(
                2, new_col, torch.where(rows == dist.gather(2, new_col), pair, no_pair), "amin")
        else:
            partner = torch.where(mutual, nearest, rank).gather(1, keep)
            size_a, size_b = size.gather(1, keep), size.gather(1, partner)
            weight_a = size_a / (size_a + size_b)
            # Rows, then (on the transposed result) columns: [B, n, n] -> [B, m + 1, m + 1]. The
            # result is symmetric (average: up to rounding), so it is not transposed back.
            offset = sample * n
            keep_rows, partner_rows = (keep + offset).view(-1), (partner + offset).view(-1)
            weight_a, weight_b = weight_a[..., None], (1 - weight_a)[..., None]
            for step in range(2):
                flat = dist.reshape(-1, dist.shape[-1])
                rows_a = flat.index_select(0, keep_rows).view(batch, m + 1, -1)
                rows_b = flat.index_select(0, partner_rows).view(batch, m + 1, -1)
                dist = _combine(linkage, rows_a, rows_b, weight_a, weight_b)
                if step == 0:
                    dist = dist.mT.contiguous()
            merged = partner != keep
            size = size_a + torch.where(merged, size_b, 0)
            own_height = torch.where(merged, merge_height.gather(1, keep), own_height.gather(1, keep))
        dist.diagonal(dim1=1, dim2=2).fill_(dist_inf)
        first = first.gather(1, keep)
    if not heights:
        empty = torch.empty(batch, 0, dtype=torch.long, device=device)
        return empty, empty, torch.empty(batch, 0, dtype=dtype, device=device)
    return torch.cat(children, 1), torch.cat(parents, 1), torch.cat(heights, 1)


def _components(num_tokens: int, child: Tensor, parent: Tensor, kept: Tensor) -> Tensor:
    """Connected components of the kept edges ``child - parent`` [B, E] -> first-member labels."""
    index = torch.arange(num_tokens, device=child.device)
    child = torch.where(kept, child, 0)
    parent = torch.where(kept, parent, 0)
    root = index.repeat(child.shape[0], 1)
    while True:  # hook the higher root onto the lower one, then jump to the roots
        a, b = root.gather(1, child), root.gather(1, parent)
        hooked = _pointer_jump(root.scatter_reduce(1, torch.maximum(a, b), torch.minimum(a, b), "amin"))
        if torch.equal(hooked, root):
            break
        root = hooked
    return first_member_labels(root)


def agglomerative_clustering(metric: Tensor | None = None, num_clusters: int | Tensor | None = None,
                             linkage: str = "average", *, distances: Tensor | None = None,
                             threshold: float | None = None, valid: Tensor | None = None,
                             protected: int = 0, backend: str = "auto") -> Tensor:
    """Exact agglomerative clustering of each sample's tokens -> [B, N] int64 labels.

    Args:
        metric: [B, N, C] token features, compared by cosine distance. Give this or ``distances``.
        num_clusters: K, static stopping: exactly K clusters per sample (labels 0..K-1); an int,
            or a [B] integer tensor (one K per sample, e.g. full and edge windows in one call;
            a CPU tensor is checked on the host, a GPU one on the device).
        linkage: "single", "complete" or "average" (unweighted, by token count).
        distances: [B, N, N] precomputed symmetric finite distances (upper triangle is used).
        threshold: dynamic stopping instead of K: keep every merge whose linkage distance is at
            most ``threshold`` (like ``fcluster(criterion="distance")``); K varies per sample.
        valid: [B, N] bool. Invalid tokens (e.g. window padding) cluster only among themselves,
            with the same linkage; a valid and an invalid token never share a cluster.
        protected: the first ``protected`` tokens (e.g. a class token) stay singleton clusters.
        backend: "torch" (batched tensor ops, any device, :func:`_dendrogram`), "native" (the
            C++ kernel of :mod:`atc_det.native`, CPU only), "triton" (the GPU kernel of
            :mod:`atc_det.triton_clustering`, CUDA tensors, N <= 1024; one launch, no host
            synchronisation) or "auto" (native for CPU tensors, triton for CUDA tensors, torch
            where those are unavailable, with one warning, or for larger N). Native and triton
            run the same rounds, tie rules, arithmetic and cut, so they give the same labels for
            the same distances; from ``metric`` each computes the cosine distances itself, which
            may differ between backends in the last bit.

    K counts ALL clusters of a sample: protected singletons, clusters of valid tokens and clusters
    of invalid tokens, so every sample has exactly K labels and windows batch. The merges taken
    are the N - K lowest over all groups (identical padding tokens, at distance 0, merge first).
    K must be at most N and at least ``protected`` + 1 per non-empty group (valid, invalid).

    Labels are numbered by first member: the cluster holding the lowest token index is 0, etc.
    """
    if (metric is None) == (distances is None):
        raise ValueError("give exactly one of metric ([B, N, C] features) or distances ([B, N, N])")
    if (num_clusters is None) == (threshold is None):
        raise ValueError("give exactly one of num_clusters (static K) or threshold (dynamic)")
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if distances is not None:
        if not isinstance(distances, Tensor) or distances.dim() != 3 or \
                distances.shape[1] != distances.shape[2]:
            raise TypeError(f"distances must be a [B, N, N] tensor, got "
                            f"{tuple(getattr(distances, 'shape', ()))}")
        check_tokens(distances, num_clusters, valid, protected, name="distances")
        _check(torch.isclose(distances, distances.mT, rtol=1e-5, atol=1e-6).all(),
               ValueError("distances must be symmetric ([B, N, N] with D[b, i, j] == D[b, j, i])"))
        chosen = _backend(backend, distances)
        upper = torch.triu(distances, diagonal=1)
        dist = upper + upper.mT
        dist = dist.float() if dist.dtype in _HALF else dist
    else:
        check_tokens(metric, num_clusters, valid, protected, check_finite=False)
        chosen = _backend(backend, metric)
        if chosen != "native":  # the C++ kernel normalises the features and checks them itself
            _check_finite(metric, "metric")
        metric = metric.float() if metric.dtype in _HALF else metric
        dist = None
    features = distances if metric is None else metric
    batch, num_tokens = features.shape[:2]
    num_merges = None
    if num_clusters is not None:
        num_merges = num_tokens - torch.as_tensor(num_clusters).expand(batch)
    if valid is not None:
        valid = valid.to(features.device, non_blocking=True)
    groups = token_groups(batch, num_tokens, valid, protected, features.device) \
        if valid is not None or protected else None
    if chosen == "native":
        if metric is not None:  # the kernel computes the cosine distances
            return native.cluster(linkage, num_merges, threshold, groups, features=metric)
        return native.cluster(linkage, num_merges, threshold, groups, distances=dist)
    if chosen == "triton":
        from atc_det import triton_clustering

        if metric is not None and metric.dtype == torch.float32:
            return triton_clustering.cluster(linkage, num_merges, threshold, groups, features=metric)
        dist = cosine_distances(metric) if dist is None else dist
        return triton_clustering.cluster(linkage, num_merges, threshold, groups, distances=dist)
    if dist is None:
        dist = cosine_distances(metric)
    # One extra all-+inf "sentinel" row and column: compaction pads every sample with it.
    dist = torch.nn.functional.pad(dist, (0, 1, 0, 1), value=float("inf"))
    if groups is not None:
        dist[:, :num_tokens, :num_tokens].masked_fill_(groups[:, :, None] != groups[:, None, :], float("inf"))
    dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    if num_merges is not None:
        num_merges = num_merges.to(dist.device, non_blocking=True)

    child, parent, height = _dendrogram(dist, linkage, num_merges, threshold)
    if threshold is not None:
        kept = height <= threshold
    else:  # the N - K lowest merges; the stable sort keeps (round, rank) order among equal heights
        order = torch.sort(height, dim=-1, stable=True).indices
        first = torch.arange(height.shape[1], device=height.device) < num_merges[:, None]
        kept = torch.zeros_like(height, dtype=torch.bool).scatter_(1, order, first)
    return _components(num_tokens, child, parent, kept & (child < num_tokens))
