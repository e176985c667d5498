"""FLOPs and CPU wall time of the ViTDet-B backbone (Detectron2 ``ViT``) at 1024x1024: stock,
stock with SDPA attention (``apply_fast_attention``, the dense peer speedups are quoted against),
ATC at several keep rates on top of it (the time in the clustering calls broken out), ATC with
label reuse (``--cluster-blocks``), and SEC grouping (``--sec``), timed in one interleaved run.

    OMP_NUM_THREADS=2 flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_vitdet_backbone.py

FLOPs: fvcore ``FlopCountAnalysis`` (one multiply-add = one flop, fvcore's convention) traced on
the patched model itself, with ``scaled_dot_product_attention`` counted as its two matmuls;
element-wise ops (softmax, gathers, scatters, the clustering's merge rounds) are not counted.
Wall time: median of ``--runs`` rounds after one warm-up round; each round runs every model
once, in turn (batch 1, inference mode), so that a shared machine's drift hits all alike.
fvcore cannot trace the clustering itself (data-dependent rounds): the FLOP count replays the
labels of the timed runs and counts the cosine-distance matmul of the clustering metric.
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
from atc_det.modeling import apply_atc, apply_fast_attention, apply_sec
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


def sdpa_flops(inputs, outputs) -> float:
    """fvcore handle: q [.., L, D] k [.., S, D] v [.., S, Dv] -> L*S*D + L*S*Dv multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    batch = 1
    for dim in q[:-2]:
        batch *= dim
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def gflops(model: ViT, image: torch.Tensor, results: list | None) -> float:
    with torch.inference_mode(), ReplayedClustering(results or []):
        flops = FlopCountAnalysis(model, image)
        flops.set_op_handle("aten::scaled_dot_product_attention", sdpa_flops)
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return flops.total() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25],
                        help="keep rates (1: nothing to merge, the reduced blocks run the stock block)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--method", default="atc")
    parser.add_argument("--linkage", default="average")
    parser.add_argument("--metric", default="keys")
    parser.add_argument("--blocks", type=int, nargs="+", default=list(range(1, 12)))
    parser.add_argument("--cluster-blocks", type=int, nargs="*", default=[1, 5, 9],
                        help="label reuse: also ATC at each keep rate < 1 clustering only in these "
                             "blocks (none: skip)")
    parser.add_argument("--sec", action="store_true", help="also SEC grouping (SEC_SETTINGS)")
    args = parser.parse_args()

    stock = vitdet_b(args.size)
    fast = apply_fast_attention(copy.deepcopy(stock))
    image = smooth_image(args.size)
    models = [("stock (Detectron2)", stock), ("stock + SDPA", fast),
              ("ATC threshold 0 (the merged-token path, nothing merged)",
               apply_atc(copy.deepcopy(fast), threshold=0.0, blocks=args.blocks, metric=args.metric))]
    for keep in args.keep:
        atc = dict(keep_rate=keep, linkage=args.linkage, blocks=args.blocks, method=args.method,
                   metric=args.metric)
        models.append((f"ATC keep {keep:g}", apply_atc(copy.deepcopy(fast), **atc)))
        if args.cluster_blocks and keep < 1:
            models.append((f"ATC keep {keep:g}, clustering in {args.cluster_blocks}",
                           apply_atc(copy.deepcopy(fast), cluster_blocks=args.cluster_blocks, **atc)))
    for label, kwargs in SEC_SETTINGS if args.sec else []:
        models.append((label, apply_sec(copy.deepcopy(stock), **kwargs)))

    times = {name: [] for name, _ in models}
    cluster_times = {name: [] for name, _ in models}
    results = {}
    with torch.inference_mode():
        for run in range(args.runs + 1):  # run 0 is the warm-up
            for name, model in models:
                with ClusterTimer() as timer:
                    start = time.perf_counter()
                    model(image)
                    seconds = time.perf_counter() - start
                if run:
                    times[name].append(seconds)
                    cluster_times[name].append(timer.seconds)
                results[name] = timer.results
    print(f"ViTDet-B backbone, {args.size}x{args.size}, batch 1, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.runs} interleaved rounds; ATC: method "
          f"{args.method}, linkage {args.linkage}, metric {args.metric}, blocks {args.blocks}\n")
    print("| model | GFLOPs (fvcore) | time (s) | speedup vs stock + SDPA | vs stock | clustering (ms) "
          "| clustering share |")
    print("|---|---|---|---|---|---|---|")
    reference, base = (statistics.median(times[n]) for n in ("stock + SDPA", "stock (Detectron2)"))
    for name, model in models:
        seconds, cluster = statistics.median(times[name]), statistics.median(cluster_times[name])
        clustered = name.startswith("ATC")
        print(f"| {name} | {gflops(model, image, results[name]):.1f} | {seconds:.2f} | "
              f"{reference / seconds:.2f}x | {base / seconds:.2f}x | "
              f"{f'{cluster * 1e3:.0f}' if clustered else '-'} | {f'{cluster / seconds:.1%}' if clustered else '-'} |",
              flush=True)


if __name__ == "__main__":
    main()
