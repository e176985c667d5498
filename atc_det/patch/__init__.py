"""In-place adapters that add token clustering to third-party ViT implementations."""

from atc_det.patch.timm import apply_atc_timm, dense_patch_features, remove_atc_timm

__all__ = ["apply_atc_timm", "dense_patch_features", "remove_atc_timm"]
