"""The torch backend of the clustering core: batched rounds on a [B, n, n] distance matrix,
tensor ops only (any device). The dispatcher (:mod:`atc_det.clustering.dispatch`) prepares the
matrix and cuts the returned merges.

- :func:`rnn_rounds` (complete, average): in every round each cluster finds its nearest
  neighbour, and all mutual nearest-neighbour pairs of all samples merge at once, with
  Lance-Williams updates of the matrix, which is compacted to the surviving clusters. For these
  reducible linkages every such merge is a merge of the exact greedy dendrogram, so the result
  equals SciPy's ``linkage`` + ``fcluster`` (up to relabelling and ties).
- :func:`boruvka_rounds` (single): every cluster joins its nearest neighbour (Borůvka: exact
  minimum-spanning-tree edges), so there are at most ``log2 N`` rounds; the cut is Kruskal's.

Rules (both deterministic, shared with the native and Triton kernels):

* Nearest neighbours: among clusters at equal distance, cluster ``i`` picks the ``j`` whose rank
  XOR ``i``'s rank is smallest (clusters ranked by first member). The rule is symmetric, so
  groups of identical tokens pair up in parallel rounds instead of one merge per round.
* Static stopping (``num_merges``): the ``N - K`` lowest merges are kept, ordered by (height,
  round, first member of the absorbed cluster). Complete / average merge heights are made monotone
  (a merge is never recorded lower than the merges that formed its two clusters), so the kept
  merges always form a valid partial dendrogram with exactly ``K`` clusters, also where SciPy's
  ``fcluster(criterion="maxclust")`` returns fewer because of tied heights.

Host synchronisations: two per round (the stop test and the compacted size), plus one before the
first round for single and complete linkage (whether all distances are non-negative). There is no
Python loop over merges; the number of rounds is about ``log N`` on real data, at most ``N - 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from atc_det.clustering.contract import first_member_labels, pointer_jump

_NO_TIE = torch.iinfo(torch.int32).max


class _Rounds:
    """What every round of both kinds needs: the matrix (possibly viewed as int bits), tie keys,
    the merges recorded so far and the stop test."""

    def __init__(self, dist: Tensor, num_merges: Tensor | None, threshold: float | None,
                 use_bits: bool):
        self.batch, self.num_tokens = dist.shape[0], dist.shape[1] - 1
        self.dtype, self.device = dist.dtype, dist.device
        self.bits_dtype = torch.int32 if self.dtype == torch.float32 else torch.int64
        # Single / complete only take minima and maxima: on non-negative float32 values their bit
        # patterns (as int32) have the same order, and int32 reductions are faster.
        self.use_bits = use_bits and self.dtype == torch.float32 and bool(dist.amin() >= 0)
        self.dist = dist.view(self.bits_dtype) if self.use_bits else dist
        inf = torch.tensor(float("inf"), dtype=self.dtype)  # on the host: no device read
        self.inf_value = inf.view(self.bits_dtype).item() if self.use_bits else float("inf")
        self.tie_shift = 1 << self.num_tokens.bit_length()
        rank = torch.arange(self.num_tokens + 1, device=self.device, dtype=torch.int32)
        self.xor_ranks = rank[:, None] ^ rank[None, :]
        self.ranks = torch.arange(self.num_tokens + 1, device=self.device)
        self.first = self.ranks.expand(self.batch, -1)  # first member of each cluster (sentinel: N)
        self.num_merges, self.threshold = num_merges, threshold
        self.children: list[Tensor] = []
        self.parents: list[Tensor] = []
        self.heights: list[Tensor] = []

    def nearest(self) -> tuple[Tensor, Tensor, Tensor, bool]:
        """Each cluster's nearest neighbour [B, n] (ties: rank XOR rank; isolated rows point at
        themselves), its distance [B, n], whether the pair is mutual, and whether to stop (every
        later merge sorts after the ``num_merges`` lowest, lies above ``threshold``, or none is
        left: one host read)."""
        dist, n = self.dist, self.dist.shape[-1]
        rank = self.ranks[:n]
        nearest_key = dist.amin(-1)  # [B, n]
        nearest_dist = nearest_key.view(self.dtype)
        lowest_open = nearest_dist.amin(-1, keepdim=True)  # no later merge lies below this
        if self.threshold is not None:
            done = lowest_open > self.threshold
        else:
            recorded = torch.cat(self.heights, 1) if self.heights else lowest_open.new_empty(self.batch, 0)
            done = (recorded <= lowest_open).sum(-1, keepdim=True) >= self.num_merges[:, None]
        if bool((done | torch.isinf(lowest_open)).all()):
            return rank, nearest_dist, rank != rank, True
        # dist - row minimum is +0 exactly at the row's minima (NaN in all-+inf rows: all tie).
        above = torch.sub(dist, nearest_key[..., None]).view(self.bits_dtype).clamp_(0, 1)
        tie_key = torch.add(self.xor_ranks[:n, :n], above, alpha=self.tie_shift, out=above)
        nearest = rank ^ tie_key.amin(-1)
        mutual = (nearest.gather(1, nearest) == rank) & (nearest != rank)
        return nearest, nearest_dist, mutual, False

    def record(self, edge: Tensor, child: Tensor, parent: Tensor, height: Tensor) -> None:
        self.children.append(torch.where(edge, child, self.num_tokens))
        self.parents.append(parent)
        self.heights.append(torch.where(edge, height, float("inf")))

    def survivors(self, survivor: Tensor) -> tuple[Tensor, Tensor, int]:
        """New index of each survivor [B, n], the kept rows [B, m + 1] (survivors in rank order,
        then the sentinel up to m + 1 per sample) and m (one host read)."""
        n = self.dist.shape[-1]
        slot = survivor.long().cumsum(-1) - 1
        m = int(slot[:, -1].max()) + 1
        keep = self.ranks.new_full((self.batch, m + 2), n - 1).scatter_(
            1, torch.where(survivor, slot, m + 1), self.ranks[:n].expand(self.batch, -1))[:, :m + 1]
        return slot, keep, m

    def merges(self) -> tuple[Tensor, Tensor, Tensor]:
        if not self.heights:
            empty = torch.empty(self.batch, 0, dtype=torch.long, device=self.device)
            return empty, empty, torch.empty(self.batch, 0, dtype=self.dtype, device=self.device)
        return torch.cat(self.children, 1), torch.cat(self.parents, 1), torch.cat(self.heights, 1)


def _lance_williams(linkage: str, a: Tensor, b: Tensor, weight_a: Tensor, weight_b: Tensor) -> Tensor:
    """Distance to the union of two clusters from the distances to each, in place."""
    if linkage == "complete":
        return torch.maximum(a, b, out=a)
    return a.mul_(weight_a).addcmul_(b, weight_b)


def rnn_rounds(dist: Tensor, linkage: str, num_merges: Tensor | None, threshold: float | None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Complete / average linkage: reciprocal-nearest-neighbour rounds on ``dist``
    [B, N + 1, N + 1] (+inf: never merge, diagonal too; the last row and column are an all-+inf
    sentinel; overwritten). Returns the merges [B, E] in (round, rank) order: first member of the
    absorbed cluster (N: no merge), first member of the cluster it joined, and the height (made
    monotone over the dendrogram). Stops as soon as every later merge would sort after the
    ``num_merges`` [B] lowest ones, or lie above ``threshold``."""
    r = _Rounds(dist, num_merges, threshold, use_bits=linkage == "complete")
    sample = torch.arange(r.batch, device=r.device)[:, None]
    size = torch.ones(r.batch, r.num_tokens + 1, dtype=r.dtype, device=r.device)
    own_height = torch.full((r.batch, r.num_tokens + 1), -float("inf"), dtype=r.dtype, device=r.device)
    for _ in range(r.num_tokens):
        n = r.dist.shape[-1]
        rank = r.ranks[:n]
        nearest, nearest_dist, mutual, done = r.nearest()
        if done:
            break
        edge = mutual & (nearest < rank)
        height = torch.maximum(nearest_dist, torch.maximum(own_height, own_height.gather(1, nearest)))
        r.record(edge, r.first, r.first.gather(1, nearest), height)
        # The pairs merge into their lower rank, which is never an edge's child.
        _, keep, m = r.survivors(~edge & (r.first < r.num_tokens))
        partner = torch.where(mutual, nearest, rank).gather(1, keep)
        size_a, size_b = size.gather(1, keep), size.gather(1, partner)
        weight_a = size_a / (size_a + size_b)
        # Rows, then (on the transposed result) columns: [B, n, n] -> [B, m + 1, m + 1]. The
        # result is symmetric (average: up to rounding), so it is not transposed back.
        offset = sample * n
        keep_rows, partner_rows = (keep + offset).view(-1), (partner + offset).view(-1)
        weight_a, weight_b = weight_a[..., None], (1 - weight_a)[..., None]
        dist = r.dist
        for step in range(2):
            flat = dist.reshape(-1, dist.shape[-1])
            rows_a = flat.index_select(0, keep_rows).view(r.batch, m + 1, -1)
            rows_b = flat.index_select(0, partner_rows).view(r.batch, m + 1, -1)
            dist = _lance_williams(linkage, rows_a, rows_b, weight_a, weight_b)
            if step == 0:
                dist = dist.mT.contiguous()
        merged = partner != keep
        size = size_a + torch.where(merged, size_b, 0)
        own_height = torch.where(merged, height.gather(1, keep), own_height.gather(1, keep))
        dist.diagonal(dim1=1, dim2=2).fill_(r.inf_value)
        r.dist, r.first = dist, r.first.gather(1, keep)
    return r.merges()


def boruvka_rounds(dist: Tensor, num_merges: Tensor | None, threshold: float | None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Single linkage: Borůvka rounds on ``dist`` (as :func:`rnn_rounds`). Every cluster merges
    with its nearest neighbour; the merges are minimum-spanning-tree edges between the two tokens
    realising them ([B, E] each; N: no edge) with their heights."""
    r = _Rounds(dist, num_merges, threshold, use_bits=True)
    stride = r.num_tokens + 1
    pair_dtype = torch.int32 if stride * stride < _NO_TIE else torch.long
    no_pair = torch.iinfo(pair_dtype).max
    # The token pair (i * stride + j) realising each cluster distance.
    pair = torch.arange(stride * stride, device=r.device, dtype=pair_dtype).view(1, stride, stride)
    pair = pair.expand(r.batch, -1, -1)
    for _ in range(r.num_tokens):
        n = r.dist.shape[-1]
        rank = r.ranks[:n]
        nearest, nearest_dist, mutual, done = r.nearest()
        if done:
            break
        edge = torch.isfinite(nearest_dist) & ~(mutual & (nearest > rank))
        ends = pair.gather(2, nearest[..., None])[..., 0].long()
        r.record(edge, ends // stride, ends % stride, nearest_dist)
        # New clusters: the trees of the edges, each kept at its lowest rank.
        root = pointer_jump(torch.where(edge, nearest, rank))
        lowest = torch.full_like(root, n).scatter_reduce(1, root, rank.expand_as(root), "amin")
        keeper = lowest.gather(1, root)
        slot, keep, m = r.survivors((keeper == rank) & (r.first < r.num_tokens))
        new_index = torch.where(r.first < r.num_tokens, slot.gather(1, keeper), m)
        new_row = new_index[..., None].expand(-1, -1, n)
        dist = r.dist
        rows = dist.new_full((r.batch, m + 1, n), r.inf_value).scatter_reduce_(1, new_row, dist, "amin")
        pair = pair.new_full((r.batch, m + 1, n), no_pair).scatter_reduce_(
            1, new_row, torch.where(dist == rows.gather(1, new_row), pair, no_pair), "amin")
        new_col = new_index[:, None, :].expand(-1, m + 1, -1)
        dist = dist.new_full((r.batch, m + 1, m + 1), r.inf_value).scatter_reduce_(2, new_col, rows, "amin")
        pair = pair.new_full((r.batch, m + 1, m + 1), no_pair).scatter_reduce_(
            2, new_col, torch.where(rows == dist.gather(2, new_col), pair, no_pair), "amin")
        dist.diagonal(dim1=1, dim2=2).fill_(r.inf_value)
        r.dist, r.first = dist, r.first.gather(1, keep)
    return r.merges()


def components(num_tokens: int, child: Tensor, parent: Tensor, kept: Tensor) -> Tensor:
    """Connected components of the kept edges ``child - parent`` [B, E] -> first-member labels.
    One host read per hooking pass."""
    index = torch.arange(num_tokens, device=child.device)
    child = torch.where(kept, child, 0)
    parent = torch.where(kept, parent, 0)
    root = index.repeat(child.shape[0], 1)
    while True:  # hook the higher root onto the lower one, then jump to the roots
        a, b = root.gather(1, child), root.gather(1, parent)
        hooked = pointer_jump(root.scatter_reduce(1, torch.maximum(a, b), torch.minimum(a, b), "amin"))
        if torch.equal(hooked, root):
            break
        root = hooked
    return first_member_labels(root)


def cluster(dist: Tensor, linkage: str, num_merges: Tensor | None, threshold: float | None,
            groups: Tensor | None) -> Tensor:
    """Labels [B, N] int64 (first-member order) from symmetric distances ``dist`` [B, N, N]:
    ``num_merges`` [B] (static: the N - K lowest merges) or ``threshold``; tokens of different
    ``groups`` [B, N] never merge."""
    num_tokens = dist.shape[1]
    # One extra all-+inf "sentinel" row and column: compaction pads every sample with it.
    dist = torch.nn.functional.pad(dist, (0, 1, 0, 1), value=float("inf"))
    if groups is not None:
        dist[:, :num_tokens, :num_tokens].masked_fill_(groups[:, :, None] != groups[:, None, :], float("inf"))
    dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    if linkage == "single":
        child, parent, height = boruvka_rounds(dist, num_merges, threshold)
    else:
        child, parent, height = rnn_rounds(dist, linkage, num_merges, threshold)
    if threshold is not None:
        kept = height <= threshold
    else:  # the N - K lowest merges; the stable sort keeps (round, rank) order among equal heights
        order = torch.sort(height, dim=-1, stable=True).indices
        first = torch.arange(height.shape[1], device=height.device) < num_merges[:, None]
        kept = torch.zeros_like(height, dtype=torch.bool).scatter_(1, order, first)
    return components(num_tokens, child, parent, kept & (child < num_tokens))
