"""The one way atc_det patches a model: swap a module's class for a cached subclass that puts a
mixin first (``ATCBlock`` over Detectron2's, SAM's or timm's ``Block``, ``FastAttention`` over
Detectron2's and SAM's ``Attention``, timm's SEC attention). Parameters, buffers and their names
stay the module's own, so state dicts and checkpoints load unchanged; :func:`unswap_class`
restores the original class. The ATC / SEC exclusivity check lives here too. (Detectron2's SEC
attention is the exception: a module that takes over the attention's parameters.)"""

from __future__ import annotations

from torch import nn

_SUBCLASSES: dict[tuple[type, type], type] = {}


def swap_class(module: nn.Module, mixin: type, name: str) -> None:
    """Give ``module`` the class ``name(mixin, type(module))`` (cached; a no-op if it has it)."""
    cls = module.__class__
    if not issubclass(cls, mixin):
        key = (mixin, cls)
        if key not in _SUBCLASSES:
            _SUBCLASSES[key] = type(name, (mixin, cls), {"__module__": mixin.__module__})
        module.__class__ = _SUBCLASSES[key]


def unswap_class(module: nn.Module, mixin: type, attributes: tuple[str, ...] = ()) -> None:
    """Undo :func:`swap_class` and drop the mixin's instance ``attributes``."""
    cls = module.__class__
    if issubclass(cls, mixin):
        module.__class__ = next(base for base in cls.__bases__ if base is not mixin)
    for attribute in attributes:
        module.__dict__.pop(attribute, None)


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
