"""Token clustering (ATC and baselines) and SEC attention inside a timm ``VisionTransformer``, in
place. The arguments mean what they mean for every adapter (:mod:`atc_det.reduction`).

Prefix tokens (class, registers) are never merged: they are protected singletons. Two modes:

- ``"merge"`` (default here; the ATC paper's classification setting): in each reduction block the
  tokens are clustered between the attention and the MLP (metric: that attention's keys, heads
  averaged, or the block's normalised input), every cluster is replaced by the size-weighted mean
  of its members, and the tokens stay merged in all later blocks; a later reduction clusters the
  current tokens. With proportional attention every later attention adds log(cluster size) to
  its logits. A source map [B, N0] (original patch -> current token) restores dense patch
  features: :func:`dense_patch_features`.
- ``"dense"`` (the ViTDet setting): each reduction block clusters its input tokens, runs attention
  and MLP on the clusters and adds each cluster's update to its members; the token count never
  changes, so the model's output keeps its shape. The block runs the steps of the dense reduced
  block of ViTDet and SAM (:mod:`atc_det.vitdet_block`: ``dense_partition``, ``merge_tokens``,
  ``cluster_block_update``, ``unmerge_tokens``), with the same label reuse (``cluster_blocks``),
  keep-all shortcut to the stock block and state (``_atc_info["partition"]``, a
  :class:`~atc_det.reduction.Partition` with labels [B, P + N]); timm supplies its attention with
  a key bias (no relative positions), LayerScale and drop path. ``scope="image"`` (default)
  clusters all patch tokens of an image; ``scope="window"`` clusters each 14x14 window of the
  patch grid apart, as ViTDet's reduced blocks do (:func:`~atc_det.vitdet_block.cluster_grid`:
  edge windows padded, every window keeps the same fraction of its real tokens), and the
  clusters of all windows attend to each other.

Patching swaps the classes of the model, its blocks and their attentions for subclasses that
add this behaviour; parameter names and the state dict are unchanged, and :func:`remove_atc_timm`
swaps them back. :func:`apply_sec_timm` replaces the attention of chosen blocks by attention
within SEC groups of the patch tokens (prefix tokens attend to, and are keys of, every group).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atc_det.patching import SecMixin, check_not_combined, has_sec, swap_class, unswap_class
from atc_det.merge import compose_source, merge_tokens, unmerge_tokens
from atc_det.reduction import (
    Partition,
    ReductionSettings,
    check_cluster_blocks,
    check_reduction,
    cluster_attention_bias,
    cluster_tokens,
    cluster_metric,
)
from atc_det.sec import check_sec_arguments, gather_groups, scatter_groups, sec_group_indices
from atc_det.vitdet_block import cluster_block_update, cluster_grid, dense_partition
from atc_det.windows import image_cluster_ids


def default_blocks(depth: int) -> list[int]:
    """Reduction blocks at a quarter, half and three quarters of the depth: 3, 6, 9 (the 4th,
    7th and 10th block, the reduction locations of EViT and ATC) for 12 blocks."""
    return sorted({depth * quarter // 4 for quarter in (1, 2, 3)})


def _qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """timm ``Attention``'s q, k, v [B, heads, N, d] (after its q / k norms)."""
    batch, num_tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _output(attn: nn.Module, x: Tensor, out: Tensor, gate: Tensor | None) -> Tensor:
    """timm ``Attention``'s tail: heads [B, heads, N, d] -> norm, gate, projection [B, N, C]."""
    out = attn.norm(out.transpose(1, 2).reshape(*x.shape[:2], attn.attn_dim))
    return attn.proj_drop(attn.proj(out if gate is None else out * gate))


class _ATCAttention:
    """Mixin for timm's ``Attention``: an additive bias per key (log cluster size)."""

    def forward(self, x: Tensor, key_bias: Tensor | None = None) -> Tensor:
        """x [B, N, C], key_bias [B, N] or None -> [B, N, C]."""
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = _qkv(self, x)
        mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0)
        return _output(self, x, out, gate)


class _ATCBlock:
    """Mixin for timm's ``Block``: attention and MLP on the clusters of the block's tokens."""

    _atc: ReductionSettings | None  # None: a merge-mode block that only carries the clusters
    _atc_info: dict

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("ATC-patched timm blocks take no attn_mask / is_causal")
        if self._atc is not None and self._atc.mode == "dense":
            return self._dense_forward(x)
        info = self._atc_info
        size = info["size"]
        normed = self.norm1(x)
        bias = None if size is None else cluster_attention_bias(size, info["prop_attn"])
        x = x + self.drop_path1(self.ls1(self.attn(normed, key_bias=bias)))
        if self._atc is not None:
            x = _merge(x, cluster_metric(self._atc.metric, normed, self.attn), self._atc, info)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _dense_forward(self, x: Tensor) -> Tensor:
        """Dense mode, the steps of ViTDet's reduced block (:mod:`atc_det.vitdet_block`):
        x [B, P + N, C] plus the block's update of each cluster, added to its members."""
        s, info = self._atc, self._atc_info
        part = dense_partition(
            s, info, lambda: _dense_partition(cluster_metric(s.metric, self.norm1(x), self.attn), s, info))
        if part is None:  # merges nothing: the stock block's computation
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        merged, size = merge_tokens(x, part.labels, part.num_slots, check_labels=False)
        key_bias = cluster_attention_bias(size, s.prop_attn)
        update = cluster_block_update(
            self,
            merged,
            lambda normed: self.attn(normed, key_bias=key_bias),
            lambda out: self.drop_path1(self.ls1(out)),
            lambda out: self.drop_path2(self.ls2(out)),
        )
        return x + unmerge_tokens(update, part.labels)


def _dense_partition(metric: Tensor, settings: ReductionSettings, info: dict) -> Partition:
    """Dense mode's clusters of metric [B, P + N, D], one group per image: labels [B, P + N], the
    P prefix tokens singletons 0..P-1. ``scope="window"`` clusters each window of the patch grid
    apart (:func:`~atc_det.vitdet_block.cluster_grid`) and numbers an image's windows' clusters one
    after another from P (a padded window's padding cluster keeps its label, without members)."""
    num_prefix, (height, width) = info["num_prefix_tokens"], info["grid"]
    batch, num_tokens, _ = metric.shape
    if settings.scope == "image":
        valid = torch.ones(metric.shape[:2], dtype=torch.bool, device=metric.device)
        real_counts = [num_tokens - num_prefix] * batch
        return cluster_tokens(metric, valid, settings, real_counts, protected=num_prefix)
    if num_tokens - num_prefix != height * width:
        raise ValueError(f"scope 'window' needs the {height}x{width} patch grid of the model, got "
                         f"{num_tokens - num_prefix} patch tokens")
    window_size = settings.window_size
    windows = cluster_grid(metric[:, num_prefix:].reshape(batch, height, width, -1), window_size, settings)
    ids, counts = image_cluster_ids(windows.labels, windows.cluster_counts, window_size, (height, width),
                                    offset=num_prefix)
    per_image = len(windows.real_cluster_counts) // batch
    real_cluster_counts = [num_prefix + sum(windows.real_cluster_counts[i:i + per_image])
                           for i in range(0, len(windows.real_cluster_counts), per_image)]
    prefix = torch.arange(num_prefix, device=ids.device).expand(batch, -1)
    return Partition(torch.cat([prefix, ids.reshape(batch, -1)], 1), max(counts), counts, real_cluster_counts)


def _merge(x: Tensor, metric: Tensor, settings: ReductionSettings, info: dict) -> Tensor:
    """Cluster x [B, P + n, C] to [B, P + k, C] (merge mode); update info's size, source and
    real token counts (host ints: nothing is read back from the device)."""
    num_prefix = info["num_prefix_tokens"]
    size = info["size"]
    valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if size is None else size > 0
    real_counts = info["real_counts"] or [x.shape[1] - num_prefix] * x.shape[0]
    part = cluster_tokens(metric, valid, settings, real_counts, protected=num_prefix)
    labels = part.labels
    x, info["size"] = merge_tokens(x, labels, part.num_slots, size, check_labels=False)
    info["real_counts"] = [count - num_prefix for count in part.real_cluster_counts]
    info["source"] = compose_source(info["source"], labels[:, num_prefix:] - num_prefix)
    return x


class _ATCVisionTransformer:
    """Mixin for timm's ``VisionTransformer``: resets the merge state at every forward."""

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None,
                         is_causal: bool = False) -> Tensor:
        self._atc_info.update(size=None, source=None, real_counts=None)
        return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)


def _check_model(model: nn.Module) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    if not all(isinstance(b, Block) and isinstance(b.attn, Attention) for b in model.blocks):
        raise TypeError("every model.blocks[i] must be a timm Block with a timm Attention")


def apply_atc_timm(
    model: nn.Module,
    keep_rate: float | Sequence[float] = 0.5,
    linkage: str = "average",
    blocks: Sequence[int] | None = None,
    *,
    method: str = "atc",
    metric: str = "keys",
    prop_attn: bool = True,
    mode: str = "merge",
    scope: str = "image",
    threshold: float | None = None,
    cluster_blocks: Sequence[int] | None = None,
    **method_options,
) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place (again: new settings) and return it.

    Args:
        keep_rate: fraction of each reduction's input patch tokens kept, in (0, 1]; one value or
            one per block (the ATC paper's keep rate: ``int(keep_rate * T)`` clusters).
        blocks: indices of the reduction blocks (default: :func:`default_blocks`, 3, 6, 9 of 12).
        mode: "merge" (default: tokens stay merged) or "dense" (updates scattered back).
        scope: "image" (default: cluster all patch tokens of an image) or "window" (dense mode:
            cluster each 14x14 window of the patch grid apart, as in ViTDet).
        cluster_blocks: label reuse (dense mode): the reduction blocks that cluster; the others
            reuse the partition of the last clustering block before them.
        method_options: passed to the clustering method (e.g. ``generator`` for "random").
    """
    _check_model(model)
    check_not_combined("atc", False, has_sec(model.blocks))
    block_ids, rates = check_reduction(
        len(model.blocks), keep_rate, linkage, blocks, default_blocks(len(model.blocks)), method=method,
        metric=metric, mode=mode, prop_attn=prop_attn, threshold=threshold, scope=scope)
    if scope == "window" and mode != "dense":
        raise ValueError("scope 'window' (MODEL.ATC.SCOPE) needs mode 'dense' for a timm "
                         "VisionTransformer: merged tokens lie on no patch grid")
    if scope == "window" and getattr(model, "dynamic_img_size", False):
        raise ValueError("scope 'window' (MODEL.ATC.SCOPE) needs a fixed patch grid: build the "
                         "timm model without dynamic_img_size")
    rates = check_cluster_blocks(block_ids, rates, cluster_blocks, mode)
    remove_atc_timm(model)
    options = {"linkage": linkage, **method_options} if method == "atc" else method_options
    rate_of = dict(zip(block_ids, rates))
    model._atc_info = dict(partition=None, prop_attn=prop_attn, num_prefix_tokens=model.num_prefix_tokens,
                           grid=tuple(model.patch_embed.grid_size), size=None, source=None,
                           real_counts=None)
    if mode == "merge":
        swap_class(model, _ATCVisionTransformer, "ATC" + type(model).__name__)
    for index, block in enumerate(model.blocks):
        if mode == "dense" and index not in rate_of:
            continue
        swap_class(block, _ATCBlock, "ATC" + type(block).__name__)
        swap_class(block.attn, _ATCAttention, "ATC" + type(block.attn).__name__)
        block._atc_info = model._atc_info
        block._atc = None if index not in rate_of else ReductionSettings(
            keep_rate=rate_of[index], method=method, linkage=linkage, metric=metric,
            prop_attn=prop_attn, mode=mode, scope=scope,
            threshold=threshold if rate_of[index] is not None else None, method_options=options)
    return model


def remove_atc_timm(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_atc_timm` in place."""
    unswap_class(model, _ATCVisionTransformer)
    for block in model.blocks:
        unswap_class(block, _ATCBlock)
        unswap_class(block.attn, _ATCAttention)
        for name in ("_atc_info", "_atc"):
            block.__dict__.pop(name, None)
    model.__dict__.pop("_atc_info", None)
    return model


def dense_patch_features(model: nn.Module, images: Tensor) -> Tensor:
    """images [B, 3, H, W] -> final (normed) patch features restored to [B, N0, C].

    Works on patched and unpatched models; merged tokens are scattered back to their members.
    """
    tokens = model.forward_features(images)
    patches = tokens[:, model.num_prefix_tokens:]
    source = getattr(model, "_atc_info", {}).get("source")
    return patches if source is None else unmerge_tokens(patches, source)


class _SecAttention(SecMixin):
    """Mixin for timm's ``Attention``: attention within ``self._sec_groups`` SEC groups of the
    patch tokens; prefix tokens are keys of every group and attend to all tokens."""

    _sec_groups: int
    _sec_prefix: int

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("SEC-patched timm attention takes no attn_mask / is_causal")
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = _qkv(self, x)
        p, dropout = self._sec_prefix, self.attn_drop.p if self.training else 0.0
        prefix_out = F.scaled_dot_product_attention(q[:, :, :p], k, v, dropout_p=dropout)
        perm = sec_group_indices(k[:, :, p:], self._sec_groups)  # [B, heads, G, S]
        num_patches, (num_groups, group_size) = k.shape[2] - p, perm.shape[-2:]
        q_g, k_g, v_g = (gather_groups(t[:, :, p:], perm) for t in (q, k, v))
        # Every group's keys: the prefix tokens, then its members (padding slots masked).
        k_g, v_g = (torch.cat([t[:, :, None, :p].expand(-1, -1, num_groups, -1, -1), g], -2)
                    for t, g in ((k, k_g), (v, v_g)))
        mask = torch.cat([perm.new_zeros(*perm.shape[:-1], p, dtype=torch.bool),
                          perm == num_patches], -1)[..., None, :]
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
        out = F.scaled_dot_product_attention(q_g, k_g, v_g, attn_mask=mask, dropout_p=dropout)
        out = torch.cat([prefix_out, scatter_groups(out, perm, num_patches)], 2)
        return _output(self, x, out, gate)


def apply_sec_timm(model: nn.Module, blocks: Sequence[int] | None = None, *,
                   global_groups: int = 4) -> nn.Module:
    """SEC attention with ``global_groups`` groups of the patch tokens in the chosen blocks of a
    timm ``VisionTransformer`` (all blocks attend globally, so all are "global"), in place."""
    _check_model(model)
    indexes = check_sec_arguments(len(model.blocks), blocks, global_groups)
    check_not_combined("sec", any(isinstance(b, _ATCBlock) for b in model.blocks),
                       has_sec(model.blocks))
    num_patches = model.patch_embed.num_patches
    if global_groups > num_patches:
        raise ValueError(f"global_groups must be at most the {num_patches} patch tokens, got "
                         f"{global_groups}")
    for index in indexes:
        if global_groups > 1:
            attn = model.blocks[index].attn
            swap_class(attn, _SecAttention, "SEC" + type(attn).__name__)
            attn._sec_groups, attn._sec_prefix = global_groups, model.num_prefix_tokens
    return model


def remove_sec_timm(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_sec_timm` in place."""
    for block in model.blocks:
        unswap_class(block.attn, _SecAttention)
        for name in ("_sec_groups", "_sec_prefix"):
            block.attn.__dict__.pop(name, None)
    return model
