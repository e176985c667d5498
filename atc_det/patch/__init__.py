"""In-place adapters that add token clustering and SEC attention to timm ViTs."""

from atc_det.patch.timm import (
    apply_atc_timm,
    apply_sec_timm,
    dense_patch_features,
    remove_atc_timm,
    remove_sec_timm,
)

__all__ = ["apply_atc_timm", "apply_sec_timm", "dense_patch_features", "remove_atc_timm",
           "remove_sec_timm"]
