"""FLOPs and CPU wall time of the ViTDet-B backbone (Detectron2 ``ViT``) at 1024x1024, stock,
with ATC at several keep rates (the time spent in the clustering calls broken out), and with SEC
grouping (``--sec``), all in one run against the same stock baseline.

    OMP_NUM_THREADS=2 flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_vitdet_backbone.py

FLOPs: fvcore ``FlopCountAnalysis`` (one multiply-add = one flop, fvcore's convention) traced on
the patched model itself; element-wise ops (softmax, gathers, scatters, the clustering's merge
rounds) are not counted, as usual in fvcore.
Wall time: median of ``--runs`` forward passes after one warm-up, batch 1, inference mode.
fvcore cannot trace the clustering itself (data-dependent rounds): the FLOP count replays the
labels of the timed runs and counts the clustering metric and its cosine-distance matmul.
Clustering time: wall time inside ``cluster_tokens`` (the clustering calls).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from detectron2.modeling import ViT
from fvcore.nn import FlopCountAnalysis

from atc_det.clustering import cosine_distances
from atc_det.modeling import apply_atc, apply_sec
from atc_det.modeling import atc_vit


# SEC (atc_det.modeling.sec_attention.apply_sec): groups of the window's size in windowed blocks, and/or
# global blocks split into equal-size groups.
SEC_SETTINGS = [
    ("SEC windowed blocks (groups of 196)", dict(windowed=True, global_groups=1)),
    ("SEC windowed + global blocks in 4 groups", dict(windowed=True, global_groups=4)),
    ("SEC global blocks in 4 groups", dict(windowed=False, global_groups=4)),
]


def vitdet_b(size: int) -> ViT:
    """ViTDet-B backbone as in Detectron2's ``mask_rcnn_vitdet_b_100ep`` (random weights)."""
    torch.manual_seed(0)
    return ViT(
        img_size=size,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        drop_path_rate=0.0,
        window_size=14,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=torch.nn.LayerNorm,
        window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10],
        residual_block_indexes=[],
        use_rel_pos=True,
        out_feature="last_feat",
    ).eval()


def smooth_image(size: int) -> torch.Tensor:
    """A fixed image with structure at several scales (clustering cost depends on the data)."""
    generator = torch.Generator().manual_seed(0)
    image = sum(
        F.interpolate(torch.randn(1, 3, s, s, generator=generator), size=size, mode="bilinear")
        for s in (4, 16, 64, 256)
    )
    return image / image.std()


class ClusterTimer:
    """Times every ``cluster_tokens`` call of the reduced blocks while active and records their
    results in call order."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.results: list = []
        self._original = atc_vit.cluster_tokens

    def __enter__(self) -> "ClusterTimer":
        original = self._original

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.results.append(result)
            return result

        atc_vit.cluster_tokens = timed
        return self

    def __exit__(self, *exc) -> None:
        atc_vit.cluster_tokens = self._original


class ReplayedClustering:
    """fvcore cannot trace the clustering's data-dependent rounds: while active, each call
    computes the cosine distances of its clustering metric (so fvcore counts them) and then
    replays the partition recorded at the same call of a timed forward on the same image."""

    def __init__(self, results: list) -> None:
        self.results = results
        self._original = atc_vit.cluster_tokens

    def __enter__(self) -> None:
        calls = iter(self.results)

        def replayed(metric, *args, **kwargs):
            part = next(calls)
            distances = cosine_distances(metric)
            # Tie the distances to the output so that the trace keeps them.
            return part._replace(labels=part.labels + distances[:, :1, 0].long() * 0)

        atc_vit.cluster_tokens = replayed

    def __exit__(self, *exc) -> None:
        atc_vit.cluster_tokens = self._original


def measure(model: ViT, image: torch.Tensor, runs: int) -> tuple[float, float, float]:
    """(fvcore GFLOPs, median seconds per forward, median clustering seconds per forward)."""
    with torch.inference_mode():
        model(image)  # warm-up
        times, cluster_times = [], []
        for _ in range(runs):
            with ClusterTimer() as timer:
                start = time.perf_counter()
                model(image)
                times.append(time.perf_counter() - start)
            cluster_times.append(timer.seconds)
        with ReplayedClustering(timer.results):
            flops = FlopCountAnalysis(model, image)
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            gflops = flops.total() / 1e9
    return gflops, statistics.median(times), statistics.median(cluster_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--method", default="atc")
    parser.add_argument("--linkage", default="average")
    parser.add_argument("--metric", default="keys")
    parser.add_argument("--blocks", type=int, nargs="+", default=list(range(1, 12)))
    parser.add_argument("--sec", action="store_true", help="also SEC grouping (SEC_SETTINGS)")
    args = parser.parse_args()

    stock = vitdet_b(args.size)
    image = smooth_image(args.size)
    print(f"ViTDet-B backbone, {args.size}x{args.size}, batch 1, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; ATC: method {args.method}, linkage {args.linkage}, "
          f"metric {args.metric}, blocks {args.blocks}\n")
    print("| model | GFLOPs (fvcore) | FLOP speedup | time (s) | speedup | realised / FLOP speedup "
          "| clustering (s) | clustering share |")
    print("|---|---|---|---|---|---|---|---|")
    base_gflops, base_time, _ = measure(stock, image, args.runs)
    print(f"| stock | {base_gflops:.1f} | 1.00x | {base_time:.2f} | 1.00x | - | - | - |", flush=True)
    for keep in args.keep:
        model = apply_atc(copy.deepcopy(stock), keep_rate=keep, linkage=args.linkage,
                          blocks=args.blocks, method=args.method, metric=args.metric)
        gflops, seconds, cluster = measure(model, image, args.runs)
        flop_speedup, speedup = base_gflops / gflops, base_time / seconds
        print(f"| keep {keep:g} | {gflops:.1f} | {flop_speedup:.2f}x | {seconds:.2f} | {speedup:.2f}x "
              f"| {speedup / flop_speedup:.0%} | {cluster:.2f} | {cluster / seconds:.1%} |", flush=True)
    for label, kwargs in SEC_SETTINGS if args.sec else []:
        gflops, seconds, _ = measure(apply_sec(copy.deepcopy(stock), **kwargs), image, args.runs)
        flop_speedup, speedup = base_gflops / gflops, base_time / seconds
        print(f"| {label} | {gflops:.1f} | {flop_speedup:.2f}x | {seconds:.2f} | {speedup:.2f}x "
              f"| {speedup / flop_speedup:.0%} | - | - |", flush=True)


if __name__ == "__main__":
    main()
