"""The one way atc_det patches a model: swap a module's class for a cached subclass that puts a
mixin first (``ATCBlock`` over Detectron2's, SAM's or timm's ``Block``, ``FastAttention`` over
Detectron2's and SAM's ``Attention``, the SEC attention over Detectron2's, SAM's and timm's
``Attention``). Parameters, buffers and their names stay the module's own, so state dicts and
checkpoints load unchanged; :func:`unswap_class` restores the original class. The ATC / SEC
exclusivity check lives here too, with :func:`has_sec` (which recognises every SEC mixin by
its base :class:`SecMixin`)."""

from __future__ import annotations

from typing import Iterable

from torch import nn

_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, cls: type, name: str) -> type:
    """The cached class ``name(mixin, cls)``."""
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(name, (mixin, cls), {"__module__": mixin.__module__})
    return _SUBCLASSES[key]


def swap_class(module: nn.Module, mixin: type, name: str) -> None:
    """Give ``module`` the class ``name(mixin, type(module))`` (cached; a no-op if it has it)."""
    if not isinstance(module, mixin):
        module.__class__ = _subclass(mixin, module.__class__, name)


def _without(cls: type, mixin: type) -> type:
    """``cls``, a class made by :func:`swap_class` (possibly over other swapped classes), without
    ``mixin``: the other mixins stay, in their order."""
    outer, inner = cls.__bases__
    if outer is mixin:
        return inner
    rebuilt = _without(inner, mixin)
    return _subclass(outer, rebuilt, cls.__name__.replace(inner.__name__, rebuilt.__name__))


def unswap_class(module: nn.Module, mixin: type, attributes: tuple[str, ...] = ()) -> None:
    """Undo :func:`swap_class` (also under a mixin swapped in later) and drop the mixin's
    instance ``attributes``."""
    if isinstance(module, mixin):
        module.__class__ = _without(module.__class__, mixin)
    for attribute in attributes:
        module.__dict__.pop(attribute, None)


class SecMixin:
    """Base of every SEC attention mixin: what :func:`has_sec` looks for."""


def has_sec(blocks: Iterable[nn.Module]) -> bool:
    """Whether any of ``blocks`` has SEC attention (its ``attn`` has a :class:`SecMixin`)."""
    return any(isinstance(getattr(block, "attn", None), SecMixin) for block in blocks)


def check_not_combined(adding: str, has_atc: bool, has_sec: bool) -> None:
    """ATC and SEC exclude each other in one model; SEC is applied once. ``adding``: "atc" or
    "sec"; ``has_atc`` / ``has_sec``: whether the model already has them."""
    if adding == "atc" and has_sec:
        raise ValueError("this model uses SEC attention (apply_sec): ATC and SEC cannot be combined "
                         "in one model; remove_sec(model) first")
    if adding == "sec" and has_atc:
        raise ValueError("this model clusters its tokens (apply_atc): ATC and SEC cannot be combined "
                         "in one model; remove_atc(model) first")
    if adding == "sec" and has_sec:
        raise ValueError("this model already uses SEC attention: apply_sec once per model "
                         "(remove_sec(model) first to change its settings)")
