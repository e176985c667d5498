"""FLOPs and CPU wall time of the ViTDet-B backbone (Detectron2 ``ViT``) at 1024x1024: stock,
stock with SDPA attention (``apply_fast_attention``, the dense peer speedups are quoted against),
ATC at several keep rates on top of it (the time in the clustering calls broken out), ATC with
label reuse (``--cluster-blocks``), SEC grouping (``--sec``) and, with ``--compile``, the
``torch.compile`` (default inductor, ``dynamic=False``) of stock + SDPA (the compiled peer) and
of ATC at each keep rate < 1, all timed in one interleaved run.

    OMP_NUM_THREADS=2 flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_vitdet_backbone.py
    OMP_NUM_THREADS=2 flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_vitdet_backbone.py \
        --compile --profile --keep 0.75 0.5 0.25 --cluster-blocks       # the table of docs/compile.md

FLOPs: fvcore ``FlopCountAnalysis`` (one multiply-add = one flop, fvcore's convention) traced on
the patched model itself, with ``scaled_dot_product_attention`` counted as its two matmuls;
element-wise ops (softmax, gathers, scatters, the clustering's merge rounds) are not counted.
A compiled model has its eager model's FLOPs. The FLOP ratio beside each speedup is the peer's
FLOPs over the model's.
Wall time: median of ``--runs`` rounds after one warm-up round; each round runs every model
once, in turn (batch 1, inference mode), so that a shared machine's drift hits all alike.
Speedups: against the dense peer of the same kind (eager rows: eager stock + SDPA; compiled
rows: compiled stock + SDPA) and against stock Detectron2 (eager). Compile time: the first call
of each compiled model (compile + one forward), reported apart.
fvcore cannot trace the clustering itself (data-dependent rounds): the FLOP count replays the
labels of the timed runs and counts the cosine-distance matmul of the clustering metric.
Clustering time: eager rows, wall time inside ``cluster_tokens`` (the clustering calls); compiled
rows, where ``cluster_tokens`` is traced into the graph, the calls of the clustering op
(``torch.ops.atc_det.agglomerative_clustering``, the native kernel in both) that one forward
makes, recorded in eager mode and called again on the same inputs.
``--profile``: then one forward of each compiled model under ``torch.profiler``, its self CPU
time per category (clustering op, SDPA, MLP and other matmuls, gathers / scatters, other fused
kernels).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from detectron2.modeling import ViT
from fvcore.nn import FlopCountAnalysis

from atc_det.clustering import cosine_distances
from atc_det.modeling import apply_atc, apply_fast_attention, apply_sec
# The module whose ``cluster_tokens`` the reduced blocks call, where ClusterTimer and
# ReplayedClustering swap it (atc_det/offshelf.py and bench_sam.py re-point ``atc_vit`` for theirs).
from atc_det import vitdet_block as atc_vit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fixtures.machine import machine  # noqa: E402


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


class Row(NamedTuple):
    """One row of the table: ``call`` is timed; ``module`` is the model it runs (eager rows: the
    FLOP count); ``peer``: the row whose time its first speedup divides; ``twin``: the eager row of
    a compiled row, same weights and settings (its FLOPs and clustering calls)."""

    name: str
    call: Callable
    module: torch.nn.Module
    peer: str
    compiled: bool = False
    twin: str | None = None


EAGER_PEER, COMPILED_PEER, STOCK = "stock + SDPA", "stock + SDPA (compiled)", "stock (Detectron2)"


def compiled_rows(fast: ViT, keeps: list[float], atc_options: dict) -> list[Row]:
    """``torch.compile`` (default inductor, ``dynamic=False``) of stock + SDPA, the compiled peer,
    and of ATC at each keep rate < 1 on top of it: deep copies, so that no eager call mutates a
    module whose compiled code guards on it."""
    rows = [Row(COMPILED_PEER, torch.compile(copy.deepcopy(fast), dynamic=False), fast, COMPILED_PEER,
                True, EAGER_PEER)]
    for keep in keeps:
        module = apply_atc(copy.deepcopy(fast), keep_rate=keep, **atc_options)
        rows.append(Row(f"ATC keep {keep:g} (compiled)", torch.compile(module, dynamic=False), module,
                        COMPILED_PEER, True, f"ATC keep {keep:g}"))
    return rows


def replayed_clustering_seconds(module: torch.nn.Module, image: torch.Tensor, runs: int) -> float:
    """Median seconds of the clustering op calls (``torch.ops.atc_det.agglomerative_clustering``)
    that one eager forward of ``module`` makes, recorded and called again on the same inputs. A
    compiled graph calls the same op on the same shapes and K (its inputs equal up to rounding);
    wall time inside ``cluster_tokens`` cannot be taken there (traced into the graph)."""
    from benchmarks.bench_gpu import ClusteringCalls

    with torch.inference_mode():
        with ClusteringCalls() as calls:
            module(image)
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            calls.replay()
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def profile_categories(hidden: int) -> list[tuple[str, Callable[[str, str], bool]]]:
    """Where a profiled forward's time goes: (category, test on an event's name and input shapes);
    the first match wins. ``hidden``: the MLP's hidden width (its matmuls have it in a shape)."""
    def fused(name: str) -> bool:  # an inductor kernel, named after every op fused into it
        return "cpp_fused" in name

    def matmul(name: str) -> bool:
        return not fused(name) and any(w in name for w in ("mm", "linear", "matmul"))

    return [
        ("clustering op (native kernel)",
         lambda name, shapes: not fused(name) and "agglomerative_clustering" in name),
        ("attention (SDPA, and fused kernels that contain it)",
         lambda name, shapes: "scaled_dot_product" in name or "flash_attention" in name),
        ("MLP matmuls", lambda name, shapes: matmul(name) and str(hidden) in shapes),
        ("other matmuls (qkv, proj, rel-pos mask, metric)", lambda name, shapes: matmul(name)),
        ("gathers / scatters: aten index ops, fused kernels that contain one",
         lambda name, shapes: any(w in name for w in ("index", "gather", "scatter"))),
        ("other fused kernels (norms, GELU, adds, rel-pos terms)", lambda name, shapes: fused(name)),
        ("everything else (other aten ops, Python, graph calls)", lambda name, shapes: True),
    ]


def profile_forward(call: Callable, image: torch.Tensor, hidden: int) -> tuple[float, dict[str, float], list]:
    """One forward under ``torch.profiler`` (after the timed rounds, so compiled): its wall seconds,
    the self CPU seconds per category of ``profile_categories`` and the 8 costliest events."""
    from torch.profiler import ProfilerActivity, profile

    categories = profile_categories(hidden)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        call(image)
        wall = time.perf_counter() - start
    seconds = {name: 0.0 for name, _ in categories}
    events = prof.key_averages(group_by_input_shape=True)
    for event in events:
        shapes = str(event.input_shapes)
        category = next(name for name, test in categories if test(event.key, shapes))
        seconds[category] += event.self_cpu_time_total / 1e6
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return wall, seconds, [(e.key, e.count, e.self_cpu_time_total / 1e6) for e in top]


def print_profiles(rows: list[Row], image: torch.Tensor, hidden: int) -> None:
    profiles = {row.name: profile_forward(row.call, image, hidden) for row in rows}
    names = [row.name for row in rows]
    print("\nOne profiled forward (torch.profiler, self CPU time per category, ms (share of the "
          "categories' sum); inductor's kernels recorded by name, cpp.enable_kernel_profile):\n")
    print("| category | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for category, _ in profile_categories(hidden):
        cells = [f"{p[1][category] * 1e3:.0f} ({p[1][category] / sum(p[1].values()):.0%})"
                 for p in profiles.values()]
        print(f"| {category} | " + " | ".join(cells) + " |")
    print("| sum of the categories | " + " | ".join(f"{sum(p[1].values()) * 1e3:.0f}"
                                                for p in profiles.values()) + " |")
    print("| wall time of the profiled forward | " + " | ".join(f"{p[0] * 1e3:.0f}"
                                                            for p in profiles.values()) + " |")
    for name, (_, _, top) in profiles.items():
        print(f"\n{name}: costliest events (self CPU): "
              + "; ".join(f"{key} x{count} {seconds * 1e3:.0f} ms" for key, count, seconds in top))


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
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile (inductor, dynamic=False) of stock + SDPA (the "
                             "compiled peer) and of ATC at each keep rate < 1, in the same rounds")
    parser.add_argument("--profile", action="store_true",
                        help="with --compile: then one profiled forward of each compiled model, "
                             "its time per category (clustering op, gathers / scatters, SDPA, MLP)")
    args = parser.parse_args()
    if args.profile and not args.compile:
        parser.error("--profile needs --compile")
    if args.profile:  # inductor's C++ kernels record themselves in the profiler (set before compiling)
        from torch._inductor import config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True

    stock = vitdet_b(args.size)
    fast = apply_fast_attention(copy.deepcopy(stock))
    image = smooth_image(args.size)
    models = [(STOCK, stock), (EAGER_PEER, fast),
              ("ATC threshold 0 (the merged-token path, nothing merged)",
               apply_atc(copy.deepcopy(fast), threshold=0.0, blocks=args.blocks, metric=args.metric))]
    atc_options = dict(linkage=args.linkage, blocks=args.blocks, method=args.method, metric=args.metric)
    for keep in args.keep:
        models.append((f"ATC keep {keep:g}", apply_atc(copy.deepcopy(fast), keep_rate=keep, **atc_options)))
        if args.cluster_blocks and keep < 1:
            models.append((f"ATC keep {keep:g}, clustering in {args.cluster_blocks}",
                           apply_atc(copy.deepcopy(fast), keep_rate=keep, cluster_blocks=args.cluster_blocks,
                                     **atc_options)))
    for label, kwargs in SEC_SETTINGS if args.sec else []:
        models.append((label, apply_sec(copy.deepcopy(stock), **kwargs)))
    rows = [Row(name, model, model, EAGER_PEER) for name, model in models]
    if args.compile:
        rows += compiled_rows(fast, [keep for keep in args.keep if keep < 1], atc_options)

    times = {row.name: [] for row in rows}
    cluster_times = {row.name: [] for row in rows}
    compile_seconds, results = {}, {}
    with torch.inference_mode():
        for row in rows:
            if row.compiled:  # the first call compiles
                start = time.perf_counter()
                row.call(image)
                compile_seconds[row.name] = time.perf_counter() - start
        graphs = unique_graphs()
        for run in range(args.runs + 1):  # run 0 is the warm-up
            for row in rows:
                if row.compiled:  # no ClusterTimer: swapping cluster_tokens would recompile
                    start = time.perf_counter()
                    row.call(image)
                    times[row.name].append(time.perf_counter() - start)
                    continue
                with ClusterTimer() as timer:
                    start = time.perf_counter()
                    row.call(image)
                    seconds = time.perf_counter() - start
                times[row.name].append(seconds)
                cluster_times[row.name].append(timer.seconds)
                results[row.name] = timer.results
        recompiled = unique_graphs() - graphs
    for row in rows:  # drop the warm-up round
        times[row.name], cluster_times[row.name] = times[row.name][1:], cluster_times[row.name][1:]
    # A compiled row's clustering: the op calls of its eager twin (same weights and settings),
    # so that no eager call touches the state of a compiled module.
    modules = {row.name: row.module for row in rows}
    clustering = {row.name: (replayed_clustering_seconds(modules[row.twin], image, args.runs) if row.compiled
                             else statistics.median(cluster_times[row.name]))
                  for row in rows if row.name.startswith("ATC")}
    flops = {}
    for row in rows:
        flops[row.name] = flops[row.twin] if row.twin else gflops(row.module, image, results[row.name])

    print(f"ViTDet-B backbone, {args.size}x{args.size}, batch 1, {machine()}, median of {args.runs} "
          f"interleaved rounds after a warm-up round; ATC: method {args.method}, linkage "
          f"{args.linkage}, metric {args.metric}, blocks {args.blocks}\n")
    print("| model | GFLOPs (fvcore) | time (ms) | speedup vs its peer | FLOP ratio (peer / model) "
          "| speedup vs stock (Detectron2) | clustering (ms) | clustering share |")
    print("|---|---|---|---|---|---|---|---|")
    median = {name: statistics.median(samples) for name, samples in times.items()}
    for row in rows:
        seconds = median[row.name]
        cluster = clustering.get(row.name)
        cluster_cells = ("- | -" if cluster is None else
                         f"{cluster * 1e3:.0f}{' (op calls replayed)' if row.compiled else ''} | "
                         f"{cluster / seconds:.1%}")
        print(f"| {row.name} | {flops[row.name]:.1f} | {seconds * 1e3:.0f} | "
              f"{median[row.peer] / seconds:.2f}x vs {row.peer} | {flops[row.peer] / flops[row.name]:.2f}x | "
              f"{median[STOCK] / seconds:.2f}x | {cluster_cells} |", flush=True)
    if args.compile:
        print("\n| compiled model | first call (s): compile + one forward | later forward (ms) |")
        print("|---|---|---|")
        for row in rows:
            if row.compiled:
                print(f"| {row.name} | {compile_seconds[row.name]:.1f} | {median[row.name] * 1e3:.0f} |")
        print(f"\nGraphs compiled during the timed rounds (recompilations): {recompiled}")
    if args.profile:
        print_profiles([row for row in rows if row.compiled], image, fast.blocks[0].mlp.fc1.out_features)


if __name__ == "__main__":
    main()
