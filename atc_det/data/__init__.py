"""Datasets: the embedded synthetic toy dataset and checks for Detectron2's real COCO layout."""
