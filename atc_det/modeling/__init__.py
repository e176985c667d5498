"""Detectron2 adapters: the ViTDet backbone builder and ATC / SEC patches for ViT."""
