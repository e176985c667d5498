"""Token clustering inside a timm ``VisionTransformer``, in place (the ATC paper's classification
setting).

In each chosen block the tokens are clustered between the attention and the MLP, with the
attention keys averaged over heads as the metric, and every cluster is replaced by the
size-weighted mean of its members; the tokens stay merged in all later blocks. Prefix tokens
(class, registers) are never merged. With proportional attention every later attention adds
log(cluster size) to its logits. A source map [B, N0] (original patch -> current token) makes the
dense patch features restorable: :func:`dense_patch_features` unmerges the final tokens.

``keep_rate`` is the fraction of the ORIGINAL N0 patch tokens left after the last reduction
block: the m reduction blocks shrink the patch tokens geometrically, the i-th (1-based) to
``round(N0 * keep_rate ** (i / m))``, so every method ends with the same number of tokens.

Patching swaps the classes of the model, its blocks and their attentions for subclasses that
add this behaviour; parameter names and the state dict are unchanged, and
:func:`remove_atc_timm` swaps them back.
"""

from __future__ import annotations

import time

import torch.nn.functional as F
from torch import Tensor, nn

from atc_det.registry import get_method, method_names
from atc_det.merge import attention_size_bias, compose_source, merge_tokens, unmerge_tokens

DEFAULT_BLOCKS = (3, 6, 9)  # 4th, 7th and 10th block, the reduction locations of EViT and ATC


class _ATCAttention:
    """Mixin for timm's ``Attention``: proportional attention and the keys as merge metric."""

    def forward(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x [B, N, C], size [B, N] or None -> (output [B, N, C], keys mean over heads [B, N, Ch])."""
        batch, num_tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None if size is None else attention_size_bias(size).to(q.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        x = self.norm(x.transpose(1, 2).reshape(batch, num_tokens, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x)), k.mean(1)


class _ATCBlock:
    """Mixin for timm's ``Block``: attention, then (in reduction blocks) cluster + merge, then MLP."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("ATC-patched timm blocks take no attn_mask / is_causal")
        info = self._atc_info
        num_prefix = info["num_prefix_tokens"]
        if info["num_patches"] is None:
            info["num_patches"] = x.shape[1] - num_prefix
        size = info["size"] if info["prop_attn"] else None
        attn_out, metric = self.attn(self.norm1(x), size=size)
        x = x + self.drop_path1(self.ls1(attn_out))
        if self._atc_reduction is not None:
            x = _reduce(x, metric, self._atc_reduction, info)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _reduce(x: Tensor, metric: Tensor, reduction: int, info: dict) -> Tensor:
    """Cluster x [B, P + n, C] to [B, P + k, C]; update info's size and source map."""
    num_prefix, num_patches = info["num_prefix_tokens"], info["num_patches"]
    steps = len(info["blocks"])
    target = round(num_patches * info["keep_rate"] ** (reduction / steps))
    num_clusters = num_prefix + min(max(target, 1), x.shape[1] - num_prefix)
    start = time.perf_counter()
    labels = get_method(info["method"])(
        metric, num_clusters, protected=num_prefix, **info["method_kwargs"]
    )
    info["cluster_seconds"] += time.perf_counter() - start
    x, info["size"] = merge_tokens(x, labels, num_clusters, info["size"])
    info["source"] = compose_source(info["source"], labels[:, num_prefix:] - num_prefix)
    return x


class _ATCVisionTransformer:
    """Mixin for timm's ``VisionTransformer``: resets the merge state at every forward."""

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None,
                         is_causal: bool = False) -> Tensor:
        self._atc_info.update(num_patches=None, size=None, source=None, cluster_seconds=0.0)
        return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, mixin: type) -> None:
    cls = module.__class__
    if not issubclass(cls, mixin):
        key = (mixin, cls)
        if key not in _SUBCLASSES:
            _SUBCLASSES[key] = type(f"ATC{cls.__name__}", (mixin, cls), {})
        module.__class__ = _SUBCLASSES[key]


def _unswap_class(module: nn.Module, mixin: type) -> None:
    cls = module.__class__
    if issubclass(cls, mixin):
        module.__class__ = next(base for base in cls.__bases__ if base is not mixin)


def apply_atc_timm(
    model: nn.Module,
    keep_rate: float,
    method: str = "atc",
    blocks: tuple[int, ...] = DEFAULT_BLOCKS,
    prop_attn: bool = True,
    **method_kwargs,
) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place (again: new settings) and return it.

    Args:
        keep_rate: fraction of the original patch tokens kept after the last reduction, in (0, 1].
        method: a key of ``atc_det.clustering.CLUSTERING_METHODS`` ("atc", "tome", "kmedoids",
            "dpcknn", "random").
        blocks: indices of the reduction blocks (clustering between their attention and MLP).
        prop_attn: add log(cluster size) to the attention logits after the first reduction.
        method_kwargs: passed to the clustering method, e.g. ``linkage="average"`` for "atc".
    """
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    if not all(isinstance(b, Block) and isinstance(b.attn, Attention) for b in model.blocks):
        raise TypeError("every model.blocks[i] must be a timm Block with a timm Attention")
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) \
            or not 0 < keep_rate <= 1:
        raise ValueError(f"keep_rate must be a number in (0, 1], got {keep_rate!r}")
    if method not in method_names():
        raise ValueError(f"method must be one of {method_names()}, got {method!r}")
    blocks = tuple(sorted(set(blocks)))
    if not blocks or any(not isinstance(b, int) or not 0 <= b < len(model.blocks) for b in blocks):
        raise ValueError(f"blocks must be non-empty block indices in 0..{len(model.blocks) - 1}, "
                         f"got {blocks!r}")

    model._atc_info = dict(
        keep_rate=float(keep_rate), method=method, method_kwargs=method_kwargs, blocks=blocks,
        prop_attn=prop_attn, num_prefix_tokens=model.num_prefix_tokens, num_patches=None,
        size=None, source=None, cluster_seconds=0.0,
    )
    _swap_class(model, _ATCVisionTransformer)
    for index, block in enumerate(model.blocks):
        _swap_class(block, _ATCBlock)
        _swap_class(block.attn, _ATCAttention)
        block._atc_info = model._atc_info
        block._atc_reduction = blocks.index(index) + 1 if index in blocks else None
    return model


def remove_atc_timm(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_atc_timm` in place."""
    _unswap_class(model, _ATCVisionTransformer)
    for block in model.blocks:
        _unswap_class(block, _ATCBlock)
        _unswap_class(block.attn, _ATCAttention)
        for name in ("_atc_info", "_atc_reduction"):
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
