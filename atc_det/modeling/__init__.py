"""Detectron2 adapters: the ViTDet backbone builder and ATC / SEC patches for ViT."""
from .atc_vit import apply_atc, apply_atc_from_cfg, collect_source_maps
from .sec_vit import apply_sec, apply_sec_from_cfg

__all__ = ["apply_atc", "apply_atc_from_cfg", "apply_sec", "apply_sec_from_cfg", "collect_source_maps"]
