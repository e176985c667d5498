"""The one dense reduced block, and the reduced block of ViTDet-style encoders: Detectron2's
ViTDet ``ViT`` and Segment Anything's ``ImageEncoderViT`` (the same blocks: [B, H, W, C] maps,
14x14 windows and global blocks, decomposed relative positions).

The steps of a dense reduced block, small functions that every adapter calls (:class:`ATCBlock`
here, timm's dense mode in :mod:`atc_det.patch.timm`), with one state, a dict shared by the
encoder's reduced blocks: its current :class:`~atc_det.reduction.Partition` (and, with
``real_area``, each image's real area, recorded by :class:`RealAreaInput`):

- :func:`dense_partition`: the block's clusters (one clustering call, for a patch grid
  :func:`cluster_grid`), the partition of the last clustering block (label reuse), or None where
  the block merges nothing (keep rate 1, or reusing such a block): the stock block runs;
- :func:`~atc_det.merge.merge_tokens`: the size-weighted mean token of each cluster;
- :func:`cluster_block_update`: attention + MLP on the clusters, with the adapter's attention
  (proportional attention: :func:`~atc_det.reduction.cluster_attention_bias`; here also windows
  and relative positions) and its drop path / layer scale;
- :func:`~atc_det.merge.unmerge_tokens`: each cluster's update scattered back to its members.

The ViTDet block is framework-free: it reads the block's ``norm1``, ``attn`` (``qkv``, ``proj``,
``num_heads``, ``scale``, ``use_rel_pos``, ``rel_pos_h`` / ``rel_pos_w``), ``norm2``, ``mlp`` and
``window_size``, and Detectron2's ``drop_path`` / ``residual`` if present. :func:`apply_reduction`
swaps the class of selected blocks for one with the :class:`ATCBlock` mixin
(:mod:`atc_det.patching`: no new parameters, so parameter names and checkpoints are the
framework's). A reduced block, on ``x`` [B, H, W, C]:

1. splits the tokens into clustering groups: the block's attention windows (windowed blocks), the
   same 14x14 windows (global blocks, ``scope="window"``) or the whole image (``scope="image"``);
   window padding is marked invalid and never joins a real token's cluster;
2. clusters the groups on the attention keys (heads averaged) or on the normalised input of the
   block (:func:`cluster_grid`): every full window into the same K = int(keep_rate * 196)
   clusters in one batched call; a window with padding keeps the same fraction of its real
   tokens, plus one padding cluster; with ``real_area`` the input's zero padding counts as such
   padding too (its patches are found by :class:`RealAreaInput`);
3. runs attention + MLP on the size-weighted mean tokens (only the used clusters: no padding
   or empty slots, :func:`cluster_layout`), with proportional attention (+ log cluster size on
   the logits) and decomposed relative positions for a cluster's position given as a
   distribution over the lattice lines (:func:`cluster_positions`): its centroid's
   linear-interpolation weights (default) or its member histogram (exact mean over member
   pairs); see ``docs/atc_vitdet.md``. In a global block the cluster tokens of all windows of an
   image attend to each other (:func:`cluster_attention`);
4. scatters each cluster's residual update back to its members, so the block returns the dense
   [B, H, W, C] map that the next block and ``SimpleFeaturePyramid`` (or SAM's neck) expect.

In merge mode (``mode="merge"``) step 4 gives every member its cluster's new value instead, and
the partition carries over: every later block runs on the same clusters (steps 3-4 without
clustering), and a later reduction block clusters the clusters (step 2 on the cluster tokens,
composed with the partition so far). The map stays [B, H, W, C], constant within a cluster.
"""
from __future__ import annotations

import functools
import itertools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atc_det.merge import merge_tokens, unmerge_tokens
from atc_det.patching import swap_class, unswap_class
from atc_det.reduction import (
    Partition,
    ReductionSettings,
    check_cluster_blocks,
    check_reduction,
    cluster_attention_bias,
    cluster_metric,
    cluster_tokens,
    merges_nothing,
)
from atc_det.windows import (
    group_tokens,
    image_cluster_ids,
    real_area_groups,
    real_patch_extent,
    ungroup_tokens,
    window_real_counts,
)

__all__ = ["ATCBlock", "apply_reduction", "cluster_block_update", "cluster_grid", "collect_source_maps",
           "dense_partition", "remove_reduction", "unwrapped_block"]


# The largest relative-position mask :func:`cluster_attention` builds at once: longer attention
# rows take their queries in chunks (a global block's mask over all cluster pairs is 200 MB at
# 1024x1024, keep 0.5; a fresh buffer that size costs page faults on the CPU, and memory anywhere).
MASK_CHUNK_BYTES = 16 * 2**20


# ---------------------------------------------------------------------------------------------
# Pure tensor helpers
# ---------------------------------------------------------------------------------------------


def resized_rel_pos_table(rel_pos: Tensor, size: int) -> Tensor:
    """Relative-position table [L, D] resized to the 2 * size - 1 offsets of a ``size`` axis.

    Same linear resize as Detectron2's ``get_rel_pos`` (offset o sits at row o + size - 1).
    """
    length = 2 * size - 1
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.t()[None], size=length, mode="linear")
    return resized[0].t()


def interpolation_weights(coord: Tensor, size: int) -> Tensor:
    """Linear-interpolation weights of fractional positions on a grid 0..size-1.

    coord [...] -> [..., size]; a weight is max(0, 1 - |coord - r|), i.e. one-hot at integers.
    """
    grid = torch.arange(size, device=coord.device, dtype=coord.dtype)
    return (1 - (coord[..., None] - grid).abs()).clamp(min=0)


def query_rel_pos_terms(q: Tensor, weights: Tensor, table: Tensor) -> Tensor:
    """Per-query relative-position logits towards every line of one lattice axis.

    q [A, h, L, D] (unscaled queries), weights [A, L, S]: each query's position as a distribution
    over the S lattice lines, table [2S - 1, D] (offset o at row o + S - 1) -> [A, h, L, S]:
    entry r is sum_a weights[a] * q . table(a - r).
    """
    size = weights.shape[-1]
    lines = torch.arange(size, device=q.device)
    lattice = table[lines[:, None] - lines[None, :] + size - 1]  # [a, r, D]
    return torch.einsum("nhld,nlrd->nhlr", q, torch.einsum("nla,ard->nlrd", weights, lattice))


def attention_layout(used: Tensor, counts: Sequence[int]) -> tuple[Tensor, Tensor, int]:
    """Place the used slots of [G, K] in ``len(counts)`` attention rows (G = rows * groups).

    ``counts``: the number of used slots of each row, known on the host. Returns the flat slot
    index [T] of every used slot (row-major), its flat position [T] in a [rows, L] attention
    layout (slots of one row packed to the front), and L. No synchronisation with the device.
    """
    total, length, device = sum(counts), max(counts), used.device
    # Stable: the used slots come first, already in ascending order.
    slot = torch.argsort((~used.flatten()).to(torch.uint8), stable=True)[:total]
    row = slot // (used.numel() // len(counts))
    start = torch.tensor([0, *itertools.accumulate(counts[:-1])]).to(device, non_blocking=True)
    position = row * length + torch.arange(total, device=device) - start[row]
    return slot, position, length


def lattice_interpolation(coord: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The two lattice lines around fractional positions on 0..size-1 and the upper one's weight.

    coord [...] -> (lower line, upper line) int64 and the upper line's weight, each [...]: the
    non-zeros of :func:`interpolation_weights` (the upper weight is 0 at integers).
    """
    lower = coord.floor().clamp(0, size - 1)
    return lower.long(), (lower + 1).clamp(max=size - 1).long(), coord - lower


def centroid_query_terms(q: Tensor, coord: Tensor, table: Tensor, size: int) -> Tensor:
    """Per-query relative-position logits towards every line of one lattice axis, for queries at
    fractional (centroid) positions: q [A, h, L, D] (unscaled), coord [A, L], table [2S - 1, D]
    -> [A, h, L, S], entry s = sum_a wi[a] q_i . R(a - s) over the query's two interpolation lines
    (its dot products with the 2S - 1 offsets, as stock computes them, gathered and lerped)."""
    A, heads, L, _ = q.shape
    offsets = q @ table.t().to(q.dtype)  # [A, h, L, 2S - 1]
    low, high, w_high = lattice_interpolation(coord, size)
    lines = torch.arange(size, device=q.device)
    index = [(line[..., None] - lines + size - 1)[:, None].expand(A, heads, L, size) for line in (low, high)]
    return offsets.gather(-1, index[0]).lerp_(offsets.gather(-1, index[1]),
                                              w_high[:, None, :, None].to(offsets.dtype))


def rel_pos_keys(key_weights: Tensor, key_bias: Tensor) -> Tensor:
    """The key side of :func:`rel_pos_mask`: key_weights [A, L, S'] (each key's position as
    weights over the lattice lines of both axes: 2 non-zeros per axis for a centroid, the member
    histogram for "mean") and key_bias [A, L] -> [A, L, S' + 1] in the mask's dtype (float32, or
    float64 for float64 inputs)."""
    dtype = torch.promote_types(key_weights.dtype, torch.float32)
    return torch.cat([key_weights.to(dtype), key_bias[..., None].to(dtype)], -1)


def rel_pos_mask(query_terms: Tensor, keys: Tensor) -> Tensor:
    """The additive attention mask of decomposed relative positions and per-key biases.

    query_terms [A, h, L', S'] (each query's term towards each lattice line of both axes), keys
    [A, L, S' + 1] (:func:`rel_pos_keys`) -> [A, h, L', L] in the keys' dtype:
    mask(i, j) = terms_i . weights_j + key_bias_j, one matmul of inner size S' + 1 (29 in
    windowed blocks, 129 in global blocks at 1024x1024), not autocast. The logits' q.k stays
    stock's (head dim 64) in SDPA's fused kernel.
    """
    ones = query_terms.new_ones(*query_terms.shape[:-1], 1)
    with torch.autocast(query_terms.device.type, enabled=False):
        return torch.cat([query_terms, ones], -1).to(keys.dtype) @ keys[:, None].mT


def cluster_attention(
    attn: nn.Module,
    tokens: Tensor,
    positions: tuple[Tensor, Tensor],
    key_bias: Tensor,
    layout: tuple[Tensor, int, int],
    rel_pos: str = "centroid",
    grid: tuple[int, int] | None = None,
) -> Tensor:
    """A ViTDet ``Attention`` (Detectron2's or SAM's) over (cluster) tokens whose positions are distributions, with
    PyTorch's ``scaled_dot_product_attention``.

    tokens [T, C] (normalised); key_bias [T] added to the logits of each key (log size).
    ``layout`` = (position [T] in the flat attention layout, rows A, length L): tokens attend to
    the tokens of their row; empty places are masked. Relative positions, per axis:
    logit(i, j) += sum_ab wi[a] wj[b] q_i . R(a - b), exactly Detectron2's term for one-hot
    (single-token) positions, given to SDPA as its mask (:func:`rel_pos_mask`) on a lattice of
    size ``grid``, built and attended for chunks of query rows of at most ``MASK_CHUNK_BYTES``.
    ``rel_pos="centroid"``: ``positions`` = (row, col) centroids [T] (linear interpolation);
    ``"mean"``: ``positions`` = (row weights [T, Sh], col weights [T, Sw]) member histograms.
    Returns [T, C].
    """
    position, num_rows, length = layout
    C, heads = tokens.shape[-1], attn.num_heads

    def placed(values: Tensor, fill: float) -> Tensor:
        out = values.new_full((num_rows * length, *values.shape[1:]), fill)
        return out.index_copy(0, position, values).reshape(num_rows, length, *values.shape[1:])

    qkv = placed(attn.qkv(tokens), 0.0).reshape(num_rows, length, 3, heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [A, heads, L, D]
    key_bias = placed(key_bias, float("-inf"))  # [A, L]
    if not attn.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias[:, None, None, :].to(q.dtype),
                                             scale=attn.scale)
    else:
        tables = (resized_rel_pos_table(attn.rel_pos_h, grid[0]),
                  resized_rel_pos_table(attn.rel_pos_w, grid[1]))
        if rel_pos == "centroid":
            coords = [placed(c, 0.0) for c in positions]
            terms = [centroid_query_terms(q, c, t, n) for c, t, n in zip(coords, tables, grid)]
            weights = [interpolation_weights(c, n) for c, n in zip(coords, grid)]
        else:
            weights = [placed(w, 0.0) for w in positions]
            terms = [query_rel_pos_terms(q, w, t).to(q.dtype) for w, t in zip(weights, tables)]
        terms, keys = torch.cat(terms, -1), rel_pos_keys(torch.cat(weights, -1), key_bias)
        # The mask [A, h, rows, L] of one chunk of query rows at a time (rows are independent).
        rows = max(1, MASK_CHUNK_BYTES // (num_rows * heads * length * keys.dtype.itemsize))
        chunks = [F.scaled_dot_product_attention(
            q_rows, k, v, attn_mask=rel_pos_mask(terms_rows, keys).to(q.dtype), scale=attn.scale)
            for q_rows, terms_rows in zip(q.split(rows, 2), terms.split(rows, 2))]
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, 2)
    out = out.transpose(1, 2).reshape(num_rows * length, C)
    return attn.proj(out[position])


def cluster_positions(valid: Tensor, coords: Tensor, labels: Tensor, num_slots: int,
                      grid: tuple[int, int], rel_pos: str) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Which clusters hold real tokens and where they lie, from their members: valid [G, S],
    coords [G, S, 2] (lattice row, col), labels [G, S] -> real [G, K] and, per axis, each
    cluster's position for :func:`cluster_attention`: its size-weighted centroid [G * K]
    (``rel_pos="centroid"``) or its member histogram over the ``grid`` lines [G * K, grid[i]]
    (``"mean"``)."""
    extra = [valid[..., None].to(coords.dtype), coords]
    if rel_pos == "mean":
        extra += [interpolation_weights(coords[..., 0], grid[0]),
                  interpolation_weights(coords[..., 1], grid[1])]
    extra, _ = merge_tokens(torch.cat(extra, -1), labels, num_slots, check_labels=False)
    real = extra[..., 0] > 0
    if rel_pos == "mean":  # member histograms over the lattice rows / cols
        row_weights, col_weights = extra[..., 3:].split(grid, dim=-1)
        return real, (row_weights.reshape(-1, grid[0]), col_weights.reshape(-1, grid[1]))
    return real, (extra[..., 1].reshape(-1), extra[..., 2].reshape(-1))  # linearly interpolated


def cluster_layout(size: Tensor, real: Tensor, partition: Partition, num_images: int,
                   windowed: bool, prop_attn: bool) -> tuple[Tensor, tuple[Tensor, int, int], Tensor]:
    """Which of the [G, K] cluster slots (``size``, ``real`` [G, K]) attend, and with whom,
    counted on the host (``partition``'s counts): in a windowed block each window's clusters
    (padding clusters are keys as in Detectron2); else the clusters of all windows of an image,
    the real tokens where nothing is merged, else all clusters with padding clusters masked out as
    keys (their outputs are dropped). A group's clusters are its slots 0..count-1; one left
    without members (a moved padding cluster) is no key (bias -inf), its output unused. Returns
    the flat slot [T] of each used cluster, its ``layout`` for :func:`cluster_attention` and the
    key bias [G, K] (:func:`~atc_det.reduction.cluster_attention_bias`)."""
    key_bias = cluster_attention_bias(size, prop_attn)
    num_slots, counts = partition.num_slots, partition.cluster_counts
    clusters = torch.arange(num_slots, device=size.device) < torch.tensor(counts).to(
        size.device, non_blocking=True)[:, None]  # [G, K]: each group's slots 0..count-1
    if windowed:
        slot, position, length = attention_layout(clusters, counts)
        return slot, (position, size.shape[0], length), key_bias
    identity = num_slots == partition.labels.shape[1] and all(c == num_slots for c in counts)
    if identity:
        counts = partition.real_cluster_counts
    groups = len(counts) // num_images
    per_image = [sum(counts[i * groups:(i + 1) * groups]) for i in range(num_images)]
    slot, position, length = attention_layout(real if identity else clusters, per_image)
    if not identity:
        key_bias = key_bias.masked_fill(~real, float("-inf"))
    return slot, (position, num_images, length), key_bias


# ---------------------------------------------------------------------------------------------
# The steps of the dense reduced block (every adapter: ATCBlock below, timm's dense mode)
# ---------------------------------------------------------------------------------------------


def dense_partition(settings: ReductionSettings, state: dict, cluster: Callable[[], Partition],
                    shortcut: bool = True) -> Partition | None:
    """The clusters a dense reduced block runs on. ``state["partition"]``: the partition of the
    encoder's last clustering block (label reuse), shared by its reduced blocks.

    None where the block merges nothing (:func:`~atc_det.reduction.merges_nothing`): the adapter runs its stock
    block, and a keep-all block clears ``state["partition"]`` (the blocks that reuse it merge
    nothing either). Else a block with a keep rate or threshold clusters (``cluster()``, its one
    clustering call) and stores its partition; a block without reuses the stored one.
    ``shortcut=False`` (source maps) runs even a keep-all block on its singleton clusters."""
    if shortcut and merges_nothing(settings, state["partition"]):
        if settings.keeps_all:
            state["partition"] = None
        return None
    if settings.makes_partition:
        state["partition"] = cluster()
    return state["partition"]


def cluster_grid(metric: Tensor, window_size: int, settings: ReductionSettings,
                 real_hw: tuple[tuple[int, int], ...] | None = None) -> Partition:
    """One clustering call for a patch grid: metric [B, H, W, D] -> the clusters of each
    ``window_size`` window apart (:func:`~atc_det.windows.group_tokens`: row-major windows, edge
    windows padded, every window keeps the same fraction of its real tokens), labels
    [B * nW, window_size ** 2]; ``window_size`` 0: of each image, labels [B, H * W].

    ``real_hw`` (``settings.real_area``): each image's real area [B] ((rows, cols) of patches
    from the top left; the rest is input padding). A group then keeps the fraction of the tokens
    of its real area, plus the cluster of its input padding and one of its window padding (moved
    to a new last slot; should the method have split them over several clusters, one left
    without members stays an empty slot)."""
    batch, height, width, _ = metric.shape
    grouped, valid, _, _ = group_tokens(metric, window_size)
    # ``cluster_tokens`` as this module names it: benchmarks/ time and replay it here.
    if real_hw is None or settings.keeps_all:
        return cluster_tokens(grouped, valid, settings, window_real_counts(height, width, window_size) * batch)
    if len(real_hw) != batch:
        raise ValueError(f"real_area: {len(real_hw)} real areas for a batch of {batch} images")
    area = real_area_groups(tuple(real_hw), (height, width), window_size, valid.device)
    part = cluster_tokens(grouped, valid & area.inside, settings, area.inside_counts)
    # A group's input padding and window padding are its invalid tokens here: the window padding
    # of a group with both moves to a new last slot.
    window_padding_label = torch.tensor(part.cluster_counts)[:, None].to(valid.device, non_blocking=True)
    labels = torch.where(area.split_window_padding, window_padding_label, part.labels)
    counts = [count + extra for count, extra in zip(part.cluster_counts, area.has_both_paddings)]
    # The partition's "real" clusters are those of in-grid tokens: the input padding's too.
    in_grid_counts = [count + extra for count, extra in zip(part.real_cluster_counts, area.has_input_padding)]
    return Partition(labels, max(counts), counts, in_grid_counts)


def cluster_block_update(block: torch.nn.Module, merged: Tensor, attend: Callable[[Tensor], Tensor],
                         attn_scale: Callable[[Tensor], Tensor], mlp_scale: Callable[[Tensor], Tensor]
                         ) -> Tensor:
    """The residual update of a pre-norm transformer ``block`` (``norm1``, ``norm2``, ``mlp``) on
    its cluster tokens, merged [..., C] -> [..., C]: ``a = attn_scale(attend(norm1(merged)))``,
    then ``a + mlp_scale(mlp(norm2(merged + a)))``. ``attend``: the adapter's attention over the
    clusters (with :func:`~atc_det.reduction.cluster_attention_bias`); ``attn_scale`` / ``mlp_scale``: what the
    block applies to each branch before its residual sum (drop path, layer scale)."""
    update = attn_scale(attend(block.norm1(merged)))
    return update + mlp_scale(block.mlp(block.norm2(merged + update)))



# ---------------------------------------------------------------------------------------------
# The patched block
# ---------------------------------------------------------------------------------------------


class ATCBlock:
    """Mixin for a ViTDet-style ``Block``: attention and MLP run on clustered tokens.

    Put in place only by :func:`apply_reduction` (class swap); ``self._atc`` holds its
    :class:`~atc_det.reduction.ReductionSettings`. The blocks of one encoder share
    ``self._atc_state`` (``"partition"``: the current :class:`~atc_det.reduction.Partition`, for
    merge mode and label reuse; ``"real_hw"``: each image's real area, ``real_area``), which the
    first reduction block (``self._atc_first``) starts anew at every forward in merge mode (in
    dense mode the first reduction block clusters).
    """

    _atc: ReductionSettings
    _atc_source_map: Tensor | None
    _atc_state: dict
    _atc_first: bool

    def _cluster(self, x: Tensor, group: int) -> Partition:
        """This block's one clustering call: the clusters of x [B, H, W, C] on its metric, each
        ``group`` x ``group`` window apart (0: each image), labels [B * nW, group ** 2]; with
        ``real_area``, counted over the real areas that :class:`RealAreaInput` recorded."""
        real_hw = None
        if self._atc.real_area:
            real_hw = self._atc_state["real_hw"]
            if real_hw is None:
                raise RuntimeError("real_area: the input's real area is found by the encoder's "
                                   "patch_embed; call the encoder, not its blocks")
        return cluster_grid(cluster_metric(self._atc.metric, self.norm1(x), self.attn), group, self._atc,
                            real_hw)

    def _merge_partition(self, x: Tensor, group: int, tokens: Tensor, valid: Tensor) -> Partition:
        """Merge mode's clusters of x's grouped tokens [G, S, C] (``valid`` [G, S]), stored in the
        shared state: the first reduction block clusters x; a later block starts from the current
        partition (the tokens hold their cluster's value) and, in a reduction block, clusters its
        clusters: the new labels are the composition."""
        s = self._atc
        if self._atc_first:
            part = self._cluster(x, group)
        else:
            part = self._atc_state["partition"]
            if s.makes_partition:
                merged, _ = merge_tokens(tokens, part.labels, part.num_slots, check_labels=False)
                # Real and padding tokens never share a cluster: a slot is real if a member is.
                real = valid.new_zeros(valid.shape[0], part.num_slots).scatter_(1, part.labels, valid)
                normed = self.norm1(merged) * real[..., None]  # padding enters attention as zeros
                coarse = cluster_tokens(cluster_metric(s.metric, normed, self.attn), real, s,
                                        real_counts=part.real_cluster_counts)
                part = coarse._replace(labels=coarse.labels.gather(1, part.labels))
        self._atc_state["partition"] = part
        return part

    def forward(self, x: Tensor) -> Tensor:
        s = self._atc
        B, H, W, C = x.shape
        windowed = self.window_size > 0
        group = self.window_size if windowed else (s.window_size if s.scope == "window" else 0)
        if s.mode == "dense":
            part = dense_partition(s, self._atc_state, lambda: self._cluster(x, group),
                                   shortcut=not s.record_source)
            if part is None:  # merges nothing: the merged-token path would give this, slower
                return super().forward(x)
        tokens, valid, coords, pad_hw = group_tokens(x, group)
        if s.mode == "merge":
            part = self._merge_partition(x, group, tokens, valid)
        labels, K = part.labels, part.num_slots

        merged, size = merge_tokens(tokens, labels, K, check_labels=False)
        if windowed:
            # Each window attends within itself; its padding clusters are keys, as in Detectron2.
            coords = coords - coords[:, :1]
            grid = (self.window_size, self.window_size)
        else:
            # The clusters of all windows of an image attend to each other; padding is no key.
            grid = (H, W)
        real, positions = cluster_positions(valid, coords, labels, K, grid, s.rel_pos)
        slot, layout, key_bias = cluster_layout(size, real, part, B, windowed, s.prop_attn)
        image = slot // (size.numel() // B)  # image of each used cluster
        real_used = real.flatten()[slot, None]
        # DropPath (Detectron2's; SAM has none) draws one factor per image, as in the stock block.
        drop_path = getattr(self, "drop_path", None)
        drop_attn = drop_mlp = x.new_ones(B, 1)[image]
        if drop_path is not None:
            drop_attn, drop_mlp = drop_path(x.new_ones(B, 1))[image], drop_path(x.new_ones(B, 1))[image]
        update = cluster_block_update(
            self,
            merged.reshape(-1, C)[slot],
            lambda normed: cluster_attention(self.attn, normed * real_used,
                                             tuple(p[slot] for p in positions),
                                             key_bias.flatten()[slot], layout, s.rel_pos, grid),
            lambda out: drop_attn * out,
            lambda out: drop_mlp * out,
        )

        update = update.new_zeros(labels.shape[0] * K, C).index_copy(0, slot, update)
        update = unmerge_tokens(update.reshape(-1, K, C), labels)
        if s.mode == "merge":  # members take their cluster's new value
            x = ungroup_tokens(unmerge_tokens(merged, labels) + update, group, pad_hw, (H, W))
        else:
            x = x + ungroup_tokens(update, group, pad_hw, (H, W))
        if getattr(self, "use_residual_block", False):
            x = self.residual(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if s.record_source:
            self._atc_source_map, _ = image_cluster_ids(labels, [K] * labels.shape[0], group, (H, W))
        return x


class RealAreaInput:
    """Mixin for the encoder's ``patch_embed`` (``real_area=True``): before embedding the images
    [B, C, H, W] it records each one's real area in patches in the reduced blocks' shared state
    (``"real_hw"``, :func:`~atc_det.windows.real_patch_extent`: the input without its zero
    padding at the bottom and right). Put in place by :func:`apply_reduction`."""

    _atc_state: dict

    def forward(self, x: Tensor) -> Tensor:
        self._atc_state["real_hw"] = real_patch_extent(x, self.proj.stride)
        return super().forward(x)


# ---------------------------------------------------------------------------------------------
# Patching an encoder's blocks
# ---------------------------------------------------------------------------------------------


def check_atc_arguments(depth: int, keep_rate, linkage, blocks, cluster_blocks=None, real_area=False,
                        **options) -> tuple[list[int], list[float | None]]:
    """:func:`~atc_det.reduction.check_reduction` for a ViTDet-style encoder of ``depth`` blocks
    (default blocks: all but the first), plus merge mode's need for window scope, label reuse
    (``cluster_blocks``) and ``real_area``. Returns the blocks and their keep rates (None: the
    block reuses the partition)."""
    block_ids, rates = check_reduction(depth, keep_rate, linkage, blocks, range(1, depth), **options)
    if not isinstance(real_area, bool):
        raise ValueError(f"real_area (MODEL.ATC.REAL_AREA) must be True or False, got {real_area!r}")
    if real_area and (options.get("mode") != "dense" or options.get("threshold") is not None):
        raise ValueError("real_area (MODEL.ATC.REAL_AREA) counts the keep rate over each image's "
                         "unpadded area: it needs mode 'dense' (MODEL.ATC.MODE) and a keep rate, "
                         "not a threshold (MODEL.ATC.THRESHOLD)")
    if options.get("mode") == "merge" and options.get("scope") != "window":
        raise ValueError("mode 'merge' (MODEL.ATC.MODE) needs scope 'window' (MODEL.ATC.SCOPE): "
                         "windowed blocks after a reduction attend within the windows' clusters")
    if cluster_blocks is not None and options.get("scope") != "window":
        raise ValueError("cluster_blocks (MODEL.ATC.CLUSTER_BLOCKS) needs scope 'window' "
                         "(MODEL.ATC.SCOPE): the partition of the 14x14 windows is reused by "
                         "windowed and global blocks alike")
    return block_ids, check_cluster_blocks(block_ids, rates, cluster_blocks, options.get("mode"))


def apply_reduction(
    encoder: nn.Module,
    block_type: type,
    keep_rate: float | Sequence[float] = 0.5,
    linkage: str = "average",
    blocks: Sequence[int] | None = None,
    *,
    method: str = "atc",
    metric: str = "keys",
    prop_attn: bool = True,
    mode: str = "dense",
    scope: str = "window",
    threshold: float | None = None,
    rel_pos: str = "centroid",
    cluster_blocks: Sequence[int] | None = None,
    real_area: bool = False,
    **method_options,
) -> None:
    """Make the selected blocks of ``encoder`` (a ViTDet-style encoder: ``encoder.blocks``, each
    a ``block_type``, possibly wrapped for activation checkpointing; ``encoder.patch_embed``)
    reduced blocks, in place; applying again replaces the settings. The arguments are those of
    :func:`atc_det.apply_atc` (checked here); ``real_area`` also makes ``encoder.patch_embed`` a
    :class:`RealAreaInput`."""
    encoder_blocks = encoder.blocks
    block_ids, rates = check_atc_arguments(
        len(encoder_blocks), keep_rate, linkage, blocks, method=method, metric=metric, mode=mode,
        prop_attn=prop_attn, scope=scope, threshold=threshold, rel_pos=rel_pos,
        cluster_blocks=cluster_blocks, real_area=real_area)
    checkpointed = False
    for index, module in enumerate(encoder_blocks):
        block, how = unwrapped_block(module, block_type)
        if block is None:
            raise TypeError(f"blocks[{index}] is a {type(module).__name__}, not a {block_type.__name__} "
                            "(or one wrapped for activation checkpointing)")
        checkpointed = checkpointed or how is not None
    if checkpointed and (mode != "dense" or cluster_blocks is not None):
        raise ValueError("activation checkpointing (use_act_checkpoint) works with mode 'dense' "
                         "without cluster_blocks: merge mode and label reuse carry the partition "
                         "from block to block, which a recomputed block would not see")
    remove_reduction(encoder, block_type)
    window_sizes = [unwrapped_block(b, block_type)[0].window_size for b in encoder_blocks
                    if unwrapped_block(b, block_type)[0].window_size > 0]
    if mode == "merge":  # every block from the first reduction on runs on the clusters
        keep = dict(zip(block_ids, rates))
        block_ids = list(range(block_ids[0], len(encoder_blocks)))
        rates = [keep.get(index) for index in block_ids]
    # The current partition (merge mode, label reuse) and each image's real area (real_area).
    state: dict = {"partition": None, "real_hw": None}
    if real_area:
        swap_class(encoder.patch_embed, RealAreaInput, "RealArea" + type(encoder.patch_embed).__name__)
        encoder.patch_embed._atc_state = state
    for index, rate in zip(block_ids, rates):
        block, how = unwrapped_block(encoder_blocks[index], block_type)
        swap_class(block, ATCBlock, "ATC" + block_type.__name__)
        if how == "fairscale":  # its checkpointed forward calls the class's forward it was given
            wrapped = block.__dict__["forward"]
            block._atc_saved_forward = wrapped
            block.forward = functools.partial(wrapped.func, ATCBlock.forward, *wrapped.args[1:],
                                              **wrapped.keywords)
        block._atc = ReductionSettings(
            keep_rate=rate,
            method=method,
            linkage=linkage,
            metric=metric,
            prop_attn=prop_attn,
            mode=mode,
            scope=scope,
            window_size=window_sizes[0] if window_sizes else 14,
            threshold=threshold if rate is not None else None,
            rel_pos=rel_pos,
            real_area=real_area,
            method_options={"linkage": linkage, **method_options} if method == "atc" else method_options,
        )
        block._atc_source_map = None
        block._atc_state = state
        block._atc_first = index == block_ids[0]


def remove_reduction(encoder: nn.Module, block_type: type) -> None:
    """Undo :func:`apply_reduction` in place (blocks without ATC are left as they are)."""
    if isinstance(encoder.patch_embed, RealAreaInput):
        unswap_class(encoder.patch_embed, RealAreaInput, ("_atc_state",))
    for module in encoder.blocks:
        block = unwrapped_block(module, block_type)[0]
        if isinstance(block, ATCBlock):
            if "_atc_saved_forward" in block.__dict__:
                block.forward = block.__dict__.pop("_atc_saved_forward")
            unswap_class(block, ATCBlock, ("_atc", "_atc_source_map", "_atc_state", "_atc_first"))


def unwrapped_block(module: nn.Module, block_type: type) -> tuple[nn.Module | None, str | None]:
    """The ``block_type`` block in ``encoder.blocks[i]`` and how it is checkpointed: None, "torch"
    (``torch.distributed.algorithms._checkpoint.checkpoint_wrapper``: the block is its
    ``_checkpoint_wrapped_module``) or "fairscale" (fairscale's ``checkpoint_wrapper``, which
    Detectron2's ViT applies with ``use_act_checkpoint=True``: the block's ``forward`` is
    replaced by a checkpointed call of its class's forward). (None, None) if it holds none."""
    inner = getattr(module, "_checkpoint_wrapped_module", None)
    if isinstance(inner, block_type):
        return inner, "torch"
    if not isinstance(module, block_type):
        return None, None
    forward = module.__dict__.get("forward")
    if isinstance(forward, functools.partial) and getattr(forward.func, "__name__", "") == "_checkpointed_forward":
        return module, "fairscale"
    return module, None


@torch.no_grad()
def collect_source_maps(encoder: nn.Module, images: Tensor) -> dict[int, Tensor]:
    """Cluster id of every patch in each reduced block of ``encoder`` (a Detectron2 ``ViT`` or
    SAM's ``ImageEncoderViT``): {block index: LongTensor [B, H, W]}.

    ``images`` [B, 3, H, W] is the normalised input of ``encoder``. Ids are unique within an image
    (window index * K + label in window scope).
    """
    blocks = [getattr(b, "_checkpoint_wrapped_module", b) for b in encoder.blocks]
    reduced = {i: b for i, b in enumerate(blocks) if isinstance(b, ATCBlock)}
    for block in reduced.values():
        block._atc.record_source = True
    try:
        encoder(images)
        return {i: b._atc_source_map for i, b in reduced.items()}
    finally:
        for block in reduced.values():
            block._atc.record_source = False
            block._atc_source_map = None
