"""Detectron2 adapters: the ViTDet backbone builder and ATC / SEC patches for its ViT.

Importing this package registers the ``build_vitdet_backbone`` and ``build_secvit_fpn_backbone``
backbones in Detectron2's ``BACKBONE_REGISTRY``.
"""
import importlib.util

if importlib.util.find_spec("detectron2.modeling.backbone.vit") is None:
    raise ImportError(
        "atc_det needs a Detectron2 with ViTDet (detectron2.modeling.backbone.vit, in Detectron2 "
        "since v0.6 / 2022); this detectron2 has none: install a newer one, e.g. "
        "pip install 'git+https://github.com/facebookresearch/detectron2.git'"
    )

from . import backbone, secvit_backbone  # noqa: E402,F401  (register the backbones)
from .atc_vit import apply_atc, apply_atc_from_cfg, collect_source_maps, remove_atc  # noqa: E402
from .backbone import check_config  # noqa: E402
from .fast_attention import apply_fast_attention, remove_fast_attention  # noqa: E402
from .sec_attention import apply_sec, apply_sec_from_cfg, remove_sec  # noqa: E402

__all__ = ["apply_atc", "apply_atc_from_cfg", "apply_fast_attention", "apply_sec", "apply_sec_from_cfg",
           "check_config", "collect_source_maps", "remove_atc", "remove_fast_attention", "remove_sec"]
