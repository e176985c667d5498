"""atc_det: Agglomerative Token Clustering for ViTDet detectors in Detectron2.

``atc_det.apply_atc(model, keep_rate=..., ...)`` and ``atc_det.apply_sec(model, ...)`` take a
Detectron2 ``ViT`` or a timm ``VisionTransformer`` (see :mod:`atc_det.api`).
"""

from atc_det.api import apply_atc, apply_sec, remove_atc, remove_sec

__version__ = "0.1.0"
__all__ = ["apply_atc", "apply_sec", "remove_atc", "remove_sec"]
