"""The registry of token clustering methods: one name -> one function, for every adapter.

Every method has the call shape of ATC:
``fn(metric [B, N, C], num_clusters, *, valid=None, protected=0, **options) -> [B, N] int64``
labels numbered by first member (see :mod:`atc_det.baselines` for the shared rules). The built-in
methods live in :mod:`atc_det.clustering` (``"atc"``) and :mod:`atc_det.baselines`; they are
imported on first lookup, so neither module imports the other through the registry. A method
added with :func:`register_method` is accepted by ``atc_det.apply_atc`` for every framework.
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import Tensor

ClusteringMethod = Callable[..., Tensor]

_BUILTIN = {  # name -> (module, function)
    "atc": ("atc_det.clustering", "agglomerative_clustering"),
    "tome": ("atc_det.baselines", "tome_clustering"),
    "kmedoids": ("atc_det.baselines", "kmedoids_clustering"),
    "dpcknn": ("atc_det.baselines", "dpcknn_clustering"),
    "random": ("atc_det.baselines", "random_clustering"),
}
_registered: dict[str, ClusteringMethod] = {}


def register_method(name: str, fn: ClusteringMethod) -> ClusteringMethod:
    """Register ``fn`` under ``name`` (a new name: built-in and registered names are taken)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a clustering method name must be a non-empty str, got {name!r}")
    if name in _BUILTIN or name in _registered:
        raise ValueError(f"clustering method {name!r} is already registered")
    if not callable(fn):
        raise TypeError(f"clustering method {name!r} must be callable, got {type(fn).__name__}")
    _registered[name] = fn
    return fn


def method_names() -> tuple[str, ...]:
    """Every registered method name, built-ins first."""
    return (*_BUILTIN, *_registered)


def get_method(name: str) -> ClusteringMethod:
    """The clustering function registered as ``name``; one clear error for an unknown name."""
    if name in _registered:
        return _registered[name]
    if name not in _BUILTIN:
        raise ValueError(f"unknown clustering method {name!r}; registered: {method_names()} "
                         f"(add one with atc_det.registry.register_method)")
    module, function = _BUILTIN[name]
    return getattr(importlib.import_module(module), function)
