"""The contract of every clustering method, and the rules all of them share (no backend here).

A clustering method has ATC's call shape::

    fn(metric [B, N, C], num_clusters, *, valid=None, protected=0, **options) -> labels [B, N] int64

- cosine distance between tokens (:func:`cosine_distances`);
- exactly K clusters per sample, where K counts every cluster: the ``protected`` singletons (the
  first ``protected`` tokens, e.g. a class token), the clusters of valid tokens and the clusters
  of invalid tokens (``valid`` [B, N] False: e.g. window padding);
- a valid and an invalid token never share a cluster (:func:`token_groups`);
- labels numbered by first member: the cluster holding the lowest token index is 0, etc.
  (:func:`first_member_labels`).

The constants the backends share (linkage codes, token limits) are defined here once; the C++
kernel receives them as compiler definitions and the Triton kernel reads them as constexprs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LINKAGES = ("single", "complete", "average")
LINKAGE_CODES = {name: code for code, name in enumerate(LINKAGES)}  # kernel argument of each linkage
BACKENDS = ("auto", "torch", "native", "triton")
NATIVE_MAX_TOKENS = 65535  # largest N of the C++ kernel (a dense [N, N] matrix per sample)
TRITON_MAX_TOKENS = 1024  # largest N of the Triton kernel (larger samples use the torch path)
HALF_DTYPES = (torch.float16, torch.bfloat16)  # clustered in float32


def non_finite_error(name: str) -> ValueError:
    """The one error for NaN / Inf token features (every backend raises it)."""
    return ValueError(f"{name} contains NaN or Inf values; clean the features first")


def cosine_distances(metric: Tensor) -> Tensor:
    """Cosine distance ``1 - cos`` between tokens: [B, N, C] -> [B, N, N], symmetric, diagonal 0.

    Zero vectors have distance 1 to every other token.
    """
    unit = torch.nn.functional.normalize(metric, dim=-1)
    dissimilarity = (unit @ unit.mT).neg_().add_(1.0)
    dist = torch.add(dissimilarity, dissimilarity.mT).mul_(0.5).clamp_min_(0.0)  # exactly symmetric
    dist.diagonal(dim1=-2, dim2=-1).zero_()
    return dist


def check(condition: Tensor, error: Exception) -> None:
    """Raise ``error`` unless the bool tensor ``condition`` holds; on a GPU the check runs on the
    device (an asynchronous assert with the same message), so it never synchronises."""
    if condition.device.type == "cpu":
        if not bool(condition):
            raise error
    else:
        torch._assert_async(condition, str(error))


def check_finite(values: Tensor, name: str) -> None:
    """One :func:`non_finite_error` if ``values`` holds a NaN or an Inf."""
    if values.numel():
        check(torch.isfinite(torch.stack(torch.aminmax(values))).all(), non_finite_error(name))


_K_RULE = ("(the number of tokens N; at least 1, plus one per protected token and one for the "
           "invalid tokens of a sample)")


def check_token_arguments(metric: Tensor, num_clusters: int | Tensor | None, valid: Tensor | None,
                          protected: int, name: str = "metric") -> None:
    """The checks that need no tensor values: types and shapes of a [B, N, C] ``metric``,
    ``valid`` [B, N] bool, ``protected``, and K (an int in 1..N, or a [B] integer tensor)."""
    if not isinstance(metric, Tensor) or metric.dim() != 3 or not metric.is_floating_point():
        raise TypeError(f"{name} must be a floating-point [B, N, C] tensor, got "
                        f"{type(metric).__name__} {getattr(metric, 'shape', '')}")
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
        if num_clusters.dtype.is_floating_point or num_clusters.dtype.is_complex \
                or num_clusters.dtype == torch.bool or num_clusters.shape != (batch,):
            raise TypeError(f"num_clusters must be an int or an integer tensor of shape [B] = "
                            f"[{batch}], got {num_clusters.dtype} {tuple(num_clusters.shape)}")
    elif isinstance(num_clusters, bool) or not isinstance(num_clusters, int):
        raise TypeError(f"num_clusters must be an int or a [B] integer tensor, got "
                        f"{type(num_clusters).__name__}")
    elif not protected + int(num_tokens > protected) <= num_clusters <= num_tokens:
        raise ValueError(f"num_clusters must lie in {protected + int(num_tokens > protected)}.."
                         f"{num_tokens} {_K_RULE}, got {num_clusters}")


def check_cluster_counts(num_tokens: int, num_clusters: Tensor, groups: Tensor | None) -> None:
    """K [B] against each sample's fewest possible clusters (one per group of ``groups`` [B, N],
    see :func:`token_groups`; None: one group) and N. CPU tensors are checked on the host (the
    error names the first bad sample), others on the device."""
    fewest = group_counts(groups) if groups is not None else torch.ones_like(num_clusters)
    fewest = fewest.to(num_clusters.device)
    if fewest.device.type == "cpu":
        bad = ((num_clusters < fewest) | (num_clusters > num_tokens)).nonzero()
        if len(bad):
            sample = int(bad[0, 0])
            raise ValueError(f"num_clusters[{sample}] must lie in {int(fewest[sample])}..{num_tokens} "
                             f"{_K_RULE}, got {int(num_clusters[sample])}")
        return
    check(((fewest <= num_clusters) & (num_clusters <= num_tokens)).all(),
          ValueError(f"num_clusters must lie in K_min..{num_tokens} in every sample {_K_RULE}"))


def check_tokens(metric: Tensor, num_clusters: int | Tensor | None, valid: Tensor | None,
                 protected: int, name: str = "metric") -> None:
    """Every check of a method's arguments, values included (finite features, K per sample):
    one clear error for a bad [B, N, C] ``metric``, ``valid``, ``protected`` or K."""
    check_token_arguments(metric, num_clusters, valid, protected, name)
    check_finite(metric, name)
    batch, num_tokens = metric.shape[:2]
    if num_clusters is None or not batch:
        return
    groups = token_groups(batch, num_tokens, valid, protected, metric.device) \
        if valid is not None or protected else None
    check_cluster_counts(num_tokens, torch.as_tensor(num_clusters).expand(batch), groups)


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


def group_counts(groups: Tensor) -> Tensor:
    """Non-empty groups of each sample, [B, N] -> [B]: the fewest clusters it can have."""
    present = torch.zeros(groups.shape[0], groups.shape[1] + 2, dtype=torch.bool, device=groups.device)
    return present.scatter_(1, groups, True).sum(1)


def pointer_jump(pointer: Tensor) -> Tensor:
    """Follow ``pointer`` [B, n] (a forest with self-loops at its roots) to each tree's root."""
    for _ in range(max(1, math.ceil(math.log2(max(pointer.shape[-1], 2))))):
        pointer = pointer.gather(-1, pointer)
    return pointer


def first_member_labels(parent: Tensor) -> Tensor:
    """Labels from a forest with ``parent[b, i] <= i``: [B, N] -> [B, N] int64 in 0..K-1.

    Clusters are numbered in the order of their first (lowest-index) member.
    """
    root = pointer_jump(parent)
    is_root = root == torch.arange(parent.shape[-1], device=parent.device)
    return (is_root.long().cumsum(-1) - 1).gather(-1, root)


def relabel_by_first_member(labels: Tensor) -> Tensor:
    """Renumber arbitrary cluster ids [B, N] (values in 0..N-1) by each cluster's first member."""
    index = torch.arange(labels.shape[-1], device=labels.device).expand_as(labels)
    first = torch.full_like(labels, labels.shape[-1]).scatter_reduce(-1, labels, index, "amin")
    return first_member_labels(first.gather(-1, labels))
