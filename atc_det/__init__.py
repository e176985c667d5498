"""atc_det: Agglomerative Token Clustering for ViTDet detectors in Detectron2."""

__version__ = "0.1.0"
