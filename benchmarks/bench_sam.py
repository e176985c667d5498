"""FLOPs and CPU wall time of Segment Anything's image encoder (``ImageEncoderViT``, SAM-B by
default) at 1024x1024: stock, stock with SDPA attention (``apply_fast_attention_sam``, the dense
peer speedups are quoted against), and ATC at several keep rates on top of it (``atc_det.apply_atc``
on the encoder: dense mode, 14x14 window scope, centroid relative positions, all blocks but the
first), each eager and ``torch.compile``-d (default inductor, ``dynamic=False``), all timed in one
interleaved run.

    OMP_NUM_THREADS=2 flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_sam.py --runs 4 \
        --json docs/sam_bench.json                                      # the table of docs/sam.md

Random weights (no SAM checkpoint is needed: timing and FLOPs do not depend on the weights, only
the clustering's cost does a little, on the data). Input: a fixed smooth image with structure at
several scales (``bench_vitdet_backbone.smooth_image``), batch 1, ``torch.no_grad``.
FLOPs, wall time and speedups are taken as in ``bench_vitdet_backbone.py`` (whose helpers this
script imports; ``benchmarks/bench_gpu.py``'s ``interleaved`` runs the rounds): fvcore ``FlopCountAnalysis`` (one multiply-add = one flop) with SDPA counted as
its two matmuls and the clustering as its cosine-distance matmul (the labels of the timed run
replayed); element-wise ops are not counted; a compiled model has its eager model's FLOPs. Wall
time: median of ``--runs`` rounds after one warm-up round, each round running every model once in
turn. Speedups: against the SDPA peer of the same kind (eager vs eager, compiled vs compiled; the
FLOP ratio beside it is the peer's FLOPs over the model's), against stock of the same kind and
against eager stock. Compile time: the first call of each compiled model (compile + one forward),
reported apart. Clustering time: eager rows only, wall time inside the clustering calls.
``--large l h``: then SAM-L / SAM-H, eager only (stock + SDPA and ATC at ``--large-keep``), in a
second interleaved run.
Bad arguments: one ``error: ...`` line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def helpers():
    """The backbone benchmark's helpers (ClusterTimer, gflops, smooth_image, unique_graphs),
    imported after the arguments are checked: a bad argument gives one line, no import warnings."""
    from benchmarks import bench_vitdet_backbone

    return bench_vitdet_backbone


# segment_anything.build_sam's encoder arguments: (embed dim, depth, heads, global blocks).
SAM_ENCODERS = {
    "b": (768, 12, 12, (2, 5, 8, 11)),
    "l": (1024, 24, 16, (5, 11, 17, 23)),
    "h": (1280, 32, 16, (7, 15, 23, 31)),
}
PEER, COMPILED_PEER = "+ SDPA", "+ SDPA (compiled)"
STOCK, COMPILED_STOCK = "stock", "stock (compiled)"


class ArgumentParser(argparse.ArgumentParser):
    """Bad arguments: one ``error: ...`` line, exit status 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def sam_encoder(name: str = "b", size: int = 1024, seed: int = 0):
    """SAM-``name``'s ``ImageEncoderViT`` as ``segment_anything.build_sam`` builds it (random
    weights; SAM's own initialisation: zero position embeddings and relative-position tables),
    for ``size`` x ``size`` inputs."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    embed_dim, depth, heads, global_blocks = SAM_ENCODERS[name]
    torch.manual_seed(seed)
    return ImageEncoderViT(
        depth=depth, embed_dim=embed_dim, img_size=size, mlp_ratio=4,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_blocks, window_size=14,
        out_chans=256).eval()


class Row(NamedTuple):
    """One timed model: ``module`` is the eager model (FLOPs, clustering); ``peer`` / ``stock``:
    the rows its speedups divide; ``twin``: the eager row of a compiled row (its FLOPs)."""

    name: str
    call: Callable
    module: torch.nn.Module
    peer: str
    stock: str
    compiled: bool = False
    twin: str | None = None


def model_rows(name: str, size: int, keeps: list[float], linkage: str, compiled: bool,
               stock: bool = True) -> list[Row]:
    """Stock (if ``stock``), stock + SDPA and ATC at each keep rate on top of it; with
    ``compiled``, also the ``torch.compile`` (inductor, ``dynamic=False``) of each, on deep copies
    (no eager call mutates a module whose compiled code guards on it)."""
    from atc_det import apply_atc
    from atc_det.patch.sam import apply_fast_attention_sam

    label = f"SAM-{name.upper()}"
    base = sam_encoder(name, size)
    fast = apply_fast_attention_sam(copy.deepcopy(base))
    models = ([(STOCK, base)] if stock else []) + [(PEER, fast)] + [
        (f"ATC keep {keep:g}", apply_atc(copy.deepcopy(fast), keep_rate=keep, linkage=linkage)) for keep in keeps]
    stock_row = STOCK if stock else PEER
    rows = [Row(f"{label} {n}", m, m, f"{label} {PEER}", f"{label} {stock_row}") for n, m in models]
    if compiled:
        compiled_stock = f"{label} {COMPILED_STOCK}" if stock else f"{label} {COMPILED_PEER}"
        rows += [Row(f"{label} {n} (compiled)", torch.compile(copy.deepcopy(m), dynamic=False), m,
                     f"{label} {COMPILED_PEER}", compiled_stock, True, f"{label} {n}") for n, m in models]
    return rows


def timed_run(rows: list[Row], image: torch.Tensor, runs: int) -> dict:
    """Compile time of each compiled row (its first call), then ``runs`` interleaved rounds after
    a warm-up round; FLOPs of each eager model (the labels of its timed run replayed)."""
    from benchmarks.bench_gpu import interleaved

    ClusterTimer, gflops = helpers().ClusterTimer, helpers().gflops
    compile_seconds, cluster_seconds, results = {}, {row.name: [] for row in rows}, {}
    with torch.no_grad():
        for row in rows:
            if row.compiled:
                start = time.perf_counter()
                row.call(image)
                compile_seconds[row.name] = time.perf_counter() - start
                print(f"compiled {row.name}: {compile_seconds[row.name]:.1f} s", file=sys.stderr, flush=True)
        graphs = helpers().unique_graphs()

        def call(row: Row) -> Callable[[], None]:
            if row.compiled:  # no ClusterTimer: swapping cluster_tokens would recompile
                return lambda: row.call(image)

            def eager() -> None:
                with ClusterTimer() as timer:
                    row.call(image)
                cluster_seconds[row.name].append(timer.seconds)
                results[row.name] = timer.results
            return eager

        medians = interleaved([call(row) for row in rows], torch.device("cpu"), runs, warmup=1)
        recompiled = helpers().unique_graphs() - graphs
    seconds = dict(zip((row.name for row in rows), medians))
    flops = {}
    for row in rows:
        if not row.compiled:
            flops[row.name] = gflops(row.module, image, results[row.name])
    out = []
    for row in rows:
        clustering = (None if row.compiled or not row.name.split()[1].startswith("ATC")
                      else statistics.median(cluster_seconds[row.name][1:]))  # [0]: the warm-up
        out.append(dict(
            name=row.name, compiled=row.compiled, ms=seconds[row.name] * 1e3,
            gflops=flops[row.twin or row.name], peer=row.peer, stock=row.stock,
            speedup_vs_peer=seconds[row.peer] / seconds[row.name],
            flop_ratio_vs_peer=flops[row.peer.replace(" (compiled)", "")] / flops[row.twin or row.name],
            speedup_vs_stock=seconds[row.stock] / seconds[row.name],
            speedup_vs_eager_stock=seconds[row.stock.replace(" (compiled)", "")] / seconds[row.name],
            compile_s=compile_seconds.get(row.name),
            clustering_ms=None if clustering is None else clustering * 1e3))
    return dict(rows=out, recompiled=recompiled)


def table(result: dict) -> list[str]:
    lines = ["| model | GFLOPs (fvcore) | time (ms) | speedup vs SDPA peer (same kind) | FLOP ratio "
             "(peer / model) | speedup vs stock (same kind) | speedup vs eager stock | clustering (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        clustering = "-" if r["clustering_ms"] is None else f"{r['clustering_ms']:.0f}"
        lines.append(f"| {r['name']} | {r['gflops']:.1f} | {r['ms']:.0f} | {r['speedup_vs_peer']:.2f}x | "
                     f"{r['flop_ratio_vs_peer']:.2f}x | {r['speedup_vs_stock']:.2f}x | "
                     f"{r['speedup_vs_eager_stock']:.2f}x | {clustering} |")
    compiled = [r for r in result["rows"] if r["compiled"]]
    if compiled:
        lines += ["", "| compiled model | first call (s): compile + one forward | later forward (ms) |",
                  "|---|---|---|"]
        lines += [f"| {r['name']} | {r['compile_s']:.1f} | {r['ms']:.0f} |" for r in compiled]
        lines += ["", f"Graphs compiled during the timed rounds (recompilations): {result['recompiled']}"]
    return lines


def goal_lines(result: dict, keep: float) -> list[str]:
    """Whether ATC at ``keep`` beats its SDPA peer by at least its FLOP ratio, eager and compiled."""
    lines = []
    for r in result["rows"]:
        if r["name"].split(" ", 1)[1] in (f"ATC keep {keep:g}", f"ATC keep {keep:g} (compiled)"):
            met = r["speedup_vs_peer"] >= r["flop_ratio_vs_peer"]
            lines.append(f"- {r['name']}: {r['speedup_vs_peer']:.2f}x vs its peer, FLOP ratio "
                         f"{r['flop_ratio_vs_peer']:.2f}x: {'met' if met else 'not met'}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="b", choices=sorted(SAM_ENCODERS), help="SAM encoder (default b)")
    parser.add_argument("--size", type=int, default=1024, help="input size (a multiple of 16; SAM: 1024)")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.25], help="ATC keep rates")
    parser.add_argument("--linkage", default="average", choices=["average", "complete", "single"])
    parser.add_argument("--runs", type=int, default=3, help="timed rounds after the warm-up round")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager rows only")
    parser.add_argument("--goal-keep", type=float, default=0.5,
                        help="the keep rate whose speedup is checked against its FLOP ratio")
    parser.add_argument("--large", nargs="*", default=[], choices=["l", "h"],
                        help="then these encoders, eager only (SDPA peer and ATC at --large-keep)")
    parser.add_argument("--large-keep", type=float, nargs="+", default=[0.5])
    parser.add_argument("--large-runs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.size < 16 or args.size % 16:
        parser.error(f"--size must be a positive multiple of 16, got {args.size}")
    for keep in args.keep + args.large_keep:
        if not 0 < keep < 1:
            parser.error(f"keep rates must be in (0, 1), got {keep:g}")
    if args.runs < 1 or args.large_runs < 1:
        parser.error("--runs and --large-runs must be at least 1")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: no directory {args.json.parent}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import segment_anything  # noqa: F401
    except ImportError as error:
        print(f"error: segment_anything does not import ({error})", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    from benchmarks.fixtures.machine import machine

    image = helpers().smooth_image(args.size)
    rows = model_rows(args.model, args.size, args.keep, args.linkage, args.compile)
    result = timed_run(rows, image, args.runs)
    header = (f"SAM-{args.model.upper()} image encoder, {args.size}x{args.size}, batch 1, no_grad, "
              f"{machine()}, median of {args.runs} interleaved rounds after a warm-up round; ATC: "
              f"linkage {args.linkage}, dense mode, window scope, blocks 1-{SAM_ENCODERS[args.model][1] - 1}; "
              f"{datetime.date.today()}")
    lines = [header, "", *table(result), "", f"Goal: ATC keep {args.goal_keep:g} faster than SDPA SAM "
             "by at least its FLOP ratio:", *goal_lines(result, args.goal_keep)]
    print("\n".join(lines), flush=True)
    report = dict(command="python benchmarks/bench_sam.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  machine=machine(), date=str(datetime.date.today()), size=args.size, runs=args.runs,
                  main=result, large={})
    for name in args.large:
        large = timed_run(model_rows(name, args.size, args.large_keep, args.linkage, compiled=False,
                                     stock=False), image, args.large_runs)
        report["large"][name] = large
        print("\n".join(["", f"SAM-{name.upper()} image encoder, eager only, median of {args.large_runs} "
                         "interleaved rounds after a warm-up round (stock without SDPA not run)", "",
                         *table(large)]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
