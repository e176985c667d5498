"""What a token reduction is, for every adapter: its settings, their one validator, and the
framework-free steps of a reduced block (pure functions on tensors, no Detectron2 or timm).

The adapters (:mod:`atc_det.vitdet_block` for Detectron2's ViT and SAM's image encoder,
:mod:`atc_det.patch.timm` for timm's ``VisionTransformer``) and the entry point
:func:`atc_det.apply_atc` share these meanings:

- ``keep_rate``: the fraction of a reduction's input tokens that it keeps, as clusters:
  ``int(keep_rate * T)`` clusters (at least 1) of the ``T`` real tokens it is given, as in the
  official ATC code. One value, or one per reduction block.
- ``mode``: ``"dense"`` (each reduced block clusters its input, runs attention and MLP on the
  clusters and scatters each cluster's update back to its members: the ViTDet setting) or
  ``"merge"`` (the tokens stay merged after a reduction, later reductions cluster the clusters:
  the classification setting).
- ``method``: a name of :mod:`atc_det.registry`; ``linkage`` is passed to ``"atc"``.
- ``metric``: the features clustered: ``"keys"`` (the attention keys of the block's normalised
  input, averaged over heads) or ``"input"`` (the normalised input itself): :func:`cluster_metric`.
- ``prop_attn``: proportional attention, log(cluster size) added to the attention logits.
- ``threshold``: dynamic ATC stopping (merge while the linkage distance <= threshold) instead of
  a keep rate.
- ``real_area`` (ViTDet-style encoders, dense mode): the keep rate counts each group's tokens
  inside the image's real area only; the input padding (SAM pads every image to 1024x1024,
  Detectron2's ViTDet to a square) is one more cluster per group.

The steps of the dense reduced block that every adapter runs are in :mod:`atc_det.vitdet_block`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from atc_det.clustering import LINKAGES
from atc_det.registry import ClusteringMethod, get_method, method_names

MODES = ("dense", "merge")
METRICS = ("keys", "input")
SCOPES = ("window", "image")
REL_POS = ("centroid", "mean")


@dataclass
class ReductionSettings:
    """How one block reduces its tokens (see the module docstring for each field's meaning).

    ``keep_rate`` None: the block clusters nothing and reuses the partition it is given (the
    blocks after a reduction in merge mode, label reuse in dense mode). ``cluster_fn``: the
    method's function, looked up in the registry when the settings are made (when ``apply_atc``
    runs), never inside a forward pass.
    """

    keep_rate: float | None
    method: str = "atc"
    linkage: str = "average"
    metric: str = "keys"
    prop_attn: bool = True
    mode: str = "dense"
    scope: str = "window"
    window_size: int = 14
    threshold: float | None = None
    rel_pos: str = "centroid"
    real_area: bool = False
    record_source: bool = False
    method_options: dict = field(default_factory=dict)
    cluster_fn: ClusteringMethod = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.cluster_fn = get_method(self.method)

    @property
    def makes_partition(self) -> bool:
        """Whether this block clusters its input (False: it reuses the current partition)."""
        return self.keep_rate is not None or self.threshold is not None

    @property
    def keeps_all(self) -> bool:
        """Whether this block clusters into singletons (keep rate 1, no threshold): nothing is
        merged, so a dense block is the stock block."""
        return self.threshold is None and self.keep_rate is not None and self.keep_rate >= 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choice(name: str, value, choices: Sequence[str], key: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} ({key}) must be one of {tuple(choices)}, got {value!r}")


def check_reduction(
    num_blocks: int,
    keep_rate: float | Sequence[float],
    linkage: str,
    blocks: Sequence[int] | None,
    default_blocks: Sequence[int],
    *,
    method: str,
    metric: str,
    mode: str,
    prop_attn: bool = True,
    threshold: float | None = None,
    scope: str = "window",
    rel_pos: str = "centroid",
) -> tuple[list[int], list[float]]:
    """The one validator of every adapter's arguments; returns (sorted block indexes, keep rate
    per block). Errors name the argument and its config key (``MODEL.ATC.*``)."""
    _choice("method", method, method_names(), "MODEL.ATC.METHOD")
    _choice("linkage", linkage, LINKAGES, "MODEL.ATC.LINKAGE")
    _choice("metric", metric, METRICS, "MODEL.ATC.METRIC")
    _choice("mode", mode, MODES, "MODEL.ATC.MODE")
    _choice("scope", scope, SCOPES, "MODEL.ATC.SCOPE")
    _choice("rel_pos", rel_pos, REL_POS, "MODEL.ATC.REL_POS")
    if not isinstance(prop_attn, bool):
        raise ValueError(f"prop_attn (MODEL.ATC.PROP_ATTN) must be True or False, got {prop_attn!r}")
    if threshold is not None:
        if not (_is_number(threshold) and threshold >= 0):  # also rejects NaN
            raise ValueError(f"threshold (MODEL.ATC.THRESHOLD) must be a number >= 0 or None, got "
                             f"{threshold!r}")
        if method != "atc":
            raise ValueError(f"threshold (MODEL.ATC.THRESHOLD) needs method 'atc', got {method!r}; "
                             "set MODEL.ATC.THRESHOLD < 0 to use the keep rate")
    given = list(default_blocks) if blocks is None else list(blocks)
    bad = [b for b in given if isinstance(b, bool) or not isinstance(b, int)
           or not 0 <= b < num_blocks]
    if bad or not given or len(set(given)) != len(given):
        raise ValueError(f"blocks (MODEL.ATC.BLOCKS) must be distinct int block indexes in "
                         f"[0, {num_blocks}), at least one, got {given!r}")
    rates = [keep_rate] if isinstance(keep_rate, (int, float, str)) else keep_rate
    try:
        rates = list(rates)
    except TypeError:
        raise ValueError(f"keep_rate (MODEL.ATC.KEEP_RATE) must be a number or a list of numbers, "
                         f"got {keep_rate!r}") from None
    if len(rates) == 1:
        rates = rates * len(given)
    if len(rates) != len(given):
        raise ValueError(f"keep_rate (MODEL.ATC.KEEP_RATE) needs 1 value or one per block "
                         f"({len(given)}), got {len(rates)}")
    for rate in rates:
        if not (_is_number(rate) and 0 < rate <= 1):
            raise ValueError(f"keep_rate (MODEL.ATC.KEEP_RATE) is the fraction of a reduction's "
                             f"input tokens it keeps and must be a number in (0, 1], got {rate!r}")
    order = sorted(range(len(given)), key=given.__getitem__)
    return [given[i] for i in order], [float(rates[i]) for i in order]


def check_cluster_blocks(block_ids: list[int], rates: list[float], cluster_blocks, mode: str
                         ) -> list[float | None]:
    """Label reuse: the keep rate of each reduction block, None for the blocks that reuse the
    partition of the last clustering block before them (``cluster_blocks``: the reduction blocks
    that cluster, the first included; dense mode only, merge mode reuses anyway)."""
    if cluster_blocks is None:
        return rates
    chosen = list(cluster_blocks) if isinstance(cluster_blocks, (list, tuple, range)) else None
    if chosen is None or not chosen or len(set(chosen)) != len(chosen) or \
            any(isinstance(b, bool) or b not in block_ids for b in chosen) or block_ids[0] not in chosen:
        raise ValueError(f"cluster_blocks (MODEL.ATC.CLUSTER_BLOCKS) must be distinct indexes of the "
                         f"reduction blocks {block_ids} (MODEL.ATC.BLOCKS), including the first "
                         f"({block_ids[0]}), got {cluster_blocks!r}")
    if mode != "dense":
        raise ValueError("cluster_blocks (MODEL.ATC.CLUSTER_BLOCKS) needs mode 'dense' (merge mode "
                         "reuses the partition anyway)")
    return [rate if index in chosen else None for index, rate in zip(block_ids, rates)]


def kept_tokens(keep_rate: float, num_tokens: int) -> int:
    """Clusters a reduction keeps of ``num_tokens`` real tokens: ``int(keep_rate * T)``, >= 1."""
    return max(1, math.floor(keep_rate * num_tokens))


def cluster_metric(metric: str, normed: Tensor, attn: torch.nn.Module) -> Tensor:
    """The features a block clusters, [..., T, C] -> [..., T, D]: ``"input"``: the normalised
    tokens themselves; ``"keys"``: the attention keys of ``attn`` (a fused ``qkv`` linear layer,
    ``num_heads``; timm's per-head ``k_norm`` if it has one) averaged over heads. Without a key
    norm the head mean is taken of the weights first (the same numbers at 1 / heads of the cost)."""
    if metric == "input":
        return normed
    channels, heads = normed.shape[-1], attn.num_heads
    weight = attn.qkv.weight[channels: 2 * channels]
    bias = None if attn.qkv.bias is None else attn.qkv.bias[channels: 2 * channels]
    k_norm = getattr(attn, "k_norm", None)
    if k_norm is None or isinstance(k_norm, torch.nn.Identity):
        weight = weight.reshape(heads, -1, channels).mean(0)
        bias = None if bias is None else bias.reshape(heads, -1).mean(0)
        return F.linear(normed, weight, bias)
    keys = F.linear(normed, weight, bias).unflatten(-1, (heads, -1))
    return k_norm(keys).mean(-2)


CLUSTERING_CALL = "atc_det.clustering_call"  # profiler range of each call of a clustering method
# Methods whose num_clusters may be a [B] tensor (one K per group: one call for all groups).
PER_SAMPLE_K = ("atc",)


class Partition(NamedTuple):
    """The clusters of a batch of groups: ``labels`` [G, T] in 0..num_slots-1, and per group (host
    ints) its number of clusters (labels 0..count-1) and of real clusters (clusters of real
    tokens; the others hold its invalid tokens). Every cluster has a member, except where the
    windows of an image are numbered one after another as one group (timm's window scope): a
    padded window's padding cluster keeps its label, without members."""

    labels: Tensor
    num_slots: int
    cluster_counts: list[int]
    real_cluster_counts: list[int]


def _clustering_call():
    """The profiler range around one clustering call (eager only: a compiled graph has none)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.profiler.record_function(CLUSTERING_CALL)


def cluster_tokens(metric: Tensor, valid: Tensor, settings: ReductionSettings,
                   real_counts: Sequence[int], protected: int = 0) -> Partition:
    """Cluster each group's tokens.

    metric [G, T, D] clustering features, valid [G, T] (False: padding or empty slots, which
    only cluster among themselves). ``real_counts``: R, each group's real tokens after the
    ``protected`` ones (host ints, known from the shapes). A group keeps
    ``kept_tokens(keep_rate, R)`` clusters of its real tokens, plus the protected singletons and
    one cluster of its invalid tokens, if any, so every group keeps the same fraction of its real
    tokens. Nothing here reads the device: ATC clusters all groups in one call (one op) with one
    K per group; other methods take one call per distinct K. With ``threshold``, K varies with
    the data: the counts cost one synchronisation (a graph break under ``torch.compile``).
    """
    s = settings
    groups, num_tokens = int(metric.shape[0]), int(metric.shape[1])
    real_counts = list(real_counts)
    if s.keeps_all:
        labels = torch.arange(num_tokens, device=metric.device).expand(groups, num_tokens)
        return Partition(labels, num_tokens, [num_tokens] * groups,
                         [protected + count for count in real_counts])
    options = dict(s.method_options, protected=protected)
    with torch.no_grad():
        # Identical invalid features: the padding of a window merges into one cluster first.
        metric = metric.float().masked_fill(~valid[..., None], 1.0)
        if s.threshold is not None:
            with _clustering_call():
                labels = s.cluster_fn(metric, None, valid=valid, threshold=s.threshold, **options)
            counts = labels.amax(1) + 1
            real = valid.new_zeros(labels.shape).scatter_(1, labels, valid).sum(1)
            counts, real = counts.tolist(), real.tolist()
            return Partition(labels, max(counts), counts, real)
        kept = [protected + (kept_tokens(s.keep_rate, count) if count else 0) for count in real_counts]
        counts = [k + int(count < num_tokens - protected) for k, count in zip(kept, real_counts)]
        if s.method in PER_SAMPLE_K:
            with _clustering_call():
                labels = s.cluster_fn(metric, torch.tensor(counts), valid=valid, **options)
        else:
            labels = torch.empty(groups, num_tokens, dtype=torch.long, device=metric.device)
            for k in sorted(set(counts)):
                select = torch.tensor([g for g in range(groups) if counts[g] == k])
                select = select.to(metric.device, non_blocking=True)
                with _clustering_call():
                    labels[select] = s.cluster_fn(metric[select], k, valid=valid[select], **options)
    return Partition(labels, max(counts), counts, kept)


def merges_nothing(settings: ReductionSettings, reused: Partition | None) -> bool:
    """Whether a dense block merges nothing, so that it is the stock block: it keeps every token
    (keep rate 1), or it reuses the partition (label reuse) of such a block (``reused`` None)."""
    return settings.keeps_all or (not settings.makes_partition and reused is None)


def cluster_attention_bias(size: Tensor, prop_attn: bool) -> Tensor:
    """Additive attention bias of each cluster key, [..., K]: log(size) with proportional
    attention, else 0; -inf for empty slots (size 0) either way."""
    if prop_attn:
        return size.log()
    return torch.zeros_like(size).masked_fill(size == 0, float("-inf"))
