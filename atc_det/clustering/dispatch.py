"""The dispatcher of the clustering core: :func:`agglomerative_clustering`, and the PyTorch op
``torch.ops.atc_det.agglomerative_clustering`` that runs one backend.

The op is registered with ``torch.library.custom_op``, with a fake implementation that gives the
labels' shape and dtype, so ``torch.compile`` (Dynamo, inductor) and ``torch.export`` see one
opaque op per clustering call and never trace into a kernel. Its implementation checks the
values (finite features, symmetric distances, K per sample) and runs a backend:

- "native": the C++ kernel (:mod:`atc_det.clustering.native`), CPU tensors;
- "triton": the Triton kernel (:mod:`atc_det.clustering.triton_kernel`), CUDA tensors, one launch
  and no host synchronisation;
- "torch": the batched tensor-op rounds (:mod:`atc_det.clustering.torch_rounds`), any device;
- "auto": native on the CPU, Triton on CUDA; the torch rounds where those are unavailable (with
  one warning) or N exceeds the kernel's limit.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from atc_det.clustering import native, torch_rounds
from atc_det.clustering.contract import (
    BACKENDS,
    HALF_DTYPES,
    LINKAGES,
    NATIVE_MAX_TOKENS,
    TRITON_MAX_TOKENS,
    check,
    check_cluster_counts,
    check_finite,
    check_token_arguments,
    cosine_distances,
    token_groups,
)

_warned: set[str] = set()


def _backend(backend: str, data: Tensor) -> str:
    """The backend this call runs: "torch", "native" or "triton" (see the module docstring)."""
    device, num_tokens = data.device.type, data.shape[1]
    if backend == "native":
        if device != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors only, got {data.device}; "
                             f"use backend='triton', 'torch' or 'auto'")
        native.cluster_library()
    if backend != "auto":
        return backend
    if device == "cpu":
        if num_tokens > NATIVE_MAX_TOKENS:
            return "torch"
        if native.available():
            return "native"
        _warn_once("native", f"native clustering kernel unavailable, using the slower torch path on "
                             f"CPU ({native.unavailable_reason()})")
        return "torch"
    if device == "cuda" and num_tokens <= TRITON_MAX_TOKENS:
        from atc_det.clustering import triton_kernel  # imports triton: only for GPU tensors

        if triton_kernel.available():
            return "triton"
        _warn_once("triton", f"triton unavailable, using the slower torch path on the GPU "
                             f"({triton_kernel.unavailable_reason()})")
    return "torch"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"atc_det: {message}", RuntimeWarning, stacklevel=4)


@torch.library.custom_op("atc_det::agglomerative_clustering", mutates_args=())
def clustering_op(data: Tensor, from_distances: bool, num_clusters: Tensor | None,
                  threshold: float | None, groups: Tensor | None, linkage: str, backend: str) -> Tensor:
    """Labels [B, N] int64 of ``data``: features [B, N, C] or (``from_distances``) distances
    [B, N, N]; K [B] (``num_clusters``) or ``threshold``; ``groups`` [B, N] int64 or None. The
    arguments' types and shapes are checked by :func:`agglomerative_clustering`; the values here."""
    return _cluster(data, from_distances, num_clusters, threshold, groups, linkage, backend)


@clustering_op.register_fake
def _(data, from_distances, num_clusters, threshold, groups, linkage, backend):
    return data.new_empty(data.shape[:2], dtype=torch.long)


def _cluster(data: Tensor, from_distances: bool, num_clusters: Tensor | None, threshold: float | None,
             groups: Tensor | None, linkage: str, backend: str) -> Tensor:
    batch, num_tokens = data.shape[:2]
    name = "distances" if from_distances else "metric"
    chosen = _backend(backend, data)
    if from_distances or chosen != "native":  # the C++ kernel checks the features itself
        check_finite(data, name)
    if num_clusters is not None and batch:
        check_cluster_counts(num_tokens, num_clusters, groups)
    num_merges = None if num_clusters is None else (num_tokens - num_clusters).to(data.device)
    if data.dtype in HALF_DTYPES:
        data = data.float()
    if from_distances:
        check(torch.isclose(data, data.mT, rtol=1e-5, atol=1e-6).all(),
              ValueError("distances must be symmetric ([B, N, N] with D[b, i, j] == D[b, j, i])"))
        upper = torch.triu(data, diagonal=1)
        data = upper + upper.mT
    features = None if from_distances else data
    if chosen == "native":
        if features is not None:  # the kernel computes the cosine distances
            return native.cluster(linkage, num_merges, threshold, groups, features=features)
        return native.cluster(linkage, num_merges, threshold, groups, distances=data)
    if chosen == "triton":
        from atc_det.clustering import triton_kernel

        if features is not None and features.dtype == torch.float32:
            return triton_kernel.cluster(linkage, num_merges, threshold, groups, features=features)
        dist = cosine_distances(features) if features is not None else data
        return triton_kernel.cluster(linkage, num_merges, threshold, groups, distances=dist)
    dist = cosine_distances(features) if features is not None else data
    return torch_rounds.cluster(dist, linkage, num_merges, threshold, groups)


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
        backend: "torch", "native", "triton" or "auto" (the module docstring). Every backend
            gives SciPy's partition. Native and Triton run the same rounds, tie rules,
            arithmetic and cut, so on the same distances they give the same labels; from
            ``metric`` each computes the cosine distances itself, which may differ between
            backends in the last bits, so the labels agree where distances are not near-tied.

    K counts ALL clusters of a sample: protected singletons, clusters of valid tokens and clusters
    of invalid tokens, so every sample has exactly K labels and windows batch. The merges taken
    are the N - K lowest over all groups (identical padding tokens, at distance 0, merge first).
    K must be at most N and at least ``protected`` + 1 per non-empty group (valid, invalid).

    Labels are numbered by first member: the cluster holding the lowest token index is 0, etc.
    One call is one ``torch.ops.atc_det.agglomerative_clustering`` op: it compiles and exports
    as one node, without a graph break.
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
        check_token_arguments(distances, num_clusters, valid, protected, name="distances")
    else:
        check_token_arguments(metric, num_clusters, valid, protected)
    data = metric if distances is None else distances
    batch, num_tokens = data.shape[:2]
    if num_clusters is not None:
        num_clusters = torch.as_tensor(num_clusters).expand(batch)
    if valid is not None:
        valid = valid.to(data.device, non_blocking=True)
    groups = token_groups(batch, num_tokens, valid, protected, data.device) \
        if valid is not None or protected else None
    return clustering_op(data, distances is not None, num_clusters,
                         None if threshold is None else float(threshold), groups, linkage, backend)
