"""GPU benchmark of ATC in ViTDet-B, one script, one markdown report (also runs on the CPU).

    .venv/bin/python benchmarks/bench_gpu.py --out gpu.md          # on a GPU (not timed on one yet)
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --size 224 --batch 1 --runs 1 --dtype float32

1. Clustering of one ViTDet-B block's windows (block 1's attention keys, heads averaged, on a
   fixed smooth image; 25 windows of 196 tokens at 1024x1024, edge and corner windows padded;
   K = half of each window's real tokens + its padding cluster), each linkage: the torch path
   against the Triton kernel (on the CPU: against the native kernel).
2. The ViT-B backbone (random weights) at ``--size``, each batch size and dtype (float32, bf16
   autocast): stock Detectron2, stock with SDPA attention (``apply_fast_attention``), ATC at
   keep 0.75 / 0.5 / 0.25 (``--keep``; average linkage, blocks 1-11, on top of the SDPA attention); with
   ``--compile`` (default on CUDA) also ``torch.compile`` of stock + SDPA and of each ATC model,
   and on CUDA ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) of the same. Per row: median
   forward time, speedup against the stock + SDPA model of the same mode, the clustering calls'
   time and share (eager rows), the forward's peak memory above what was allocated before it
   (GPU), and whether ``torch.cuda.set_sync_debug_mode("error")`` lets an eager ATC forward pass.
   Compile time (first call) and graph breaks go in their own table.
3. SAM's ViT-B image encoder, stock and ATC, if ``segment_anything`` imports and
   ``atc_det.apply_atc`` accepts its ``ImageEncoderViT`` (else one line says why not).

Timing: synchronised (CUDA events on a GPU, wall clock on the CPU), warm-up calls excluded, the
models of one table interleaved run by run, the median of ``--runs``. The clustering time of a
forward: the calls of the op ``torch.ops.atc_det.agglomerative_clustering`` that one eager forward
makes are recorded (a dispatch mode sees every op call) and the same calls, on the same windows,
are timed directly.
"""
from __future__ import annotations

import argparse
import copy
import functools
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from atc_det import apply_atc as apply_any  # noqa: E402  (Detectron2, timm and other adapters)
from atc_det.clustering import agglomerative_clustering  # noqa: E402
from atc_det.modeling import apply_atc, apply_fast_attention  # noqa: E402
from atc_det.windows import group_tokens, window_real_counts  # noqa: E402
from atc_det.reduction import cluster_metric, kept_tokens  # noqa: E402
from benchmarks.bench_vitdet_backbone import smooth_image, vitdet_b  # noqa: E402
from detectron2.modeling.backbone.utils import get_abs_pos  # noqa: E402

LINKAGES = ("single", "complete", "average")
KEEP_RATES = (0.75, 0.5, 0.25)
CLUSTERING_OP = "atc_det::agglomerative_clustering"


class ArgumentParser(argparse.ArgumentParser):
    """Bad arguments: one ``error: ...`` line on stderr and exit status 2 (no usage, no traceback)."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def timed(fn, device: torch.device) -> float:
    """Seconds of one synchronised call of ``fn()`` (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: list, device: torch.device, runs: int, warmup: int = 1) -> list[float]:
    """Median seconds of each of ``fns``: ``warmup`` untimed calls each, then ``runs`` rounds
    that call every function once in turn (drift hits all alike)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, samples in zip(fns, times):
            samples.append(timed(fn, device))
    return [statistics.median(samples) for samples in times]


class ClusteringCalls(TorchDispatchMode):
    """While active, records every call of the clustering op (``torch.ops.atc_det.
    agglomerative_clustering``) with its arguments, and runs every op as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name == CLUSTERING_OP:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)

    def replay(self) -> None:
        """The recorded calls again, on the same inputs."""
        for func, args, kwargs in self.calls:
            func(*args, **kwargs)


def window_inputs(vit, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block 1's clustering input: metric [W, 196, 64], valid [W, 196], K [W] (CPU)."""
    with torch.no_grad():
        x = vit.patch_embed(image)
        x = x + get_abs_pos(vit.pos_embed, vit.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
        x = vit.blocks[0](x)
        block = vit.blocks[1]
        tokens, valid, _, _ = group_tokens(x, 14)
        keys = cluster_metric("keys", block.norm1(tokens) * valid[..., None], block.attn)
    counts = window_real_counts(x.shape[1], x.shape[2], 14) * image.shape[0]
    k = torch.tensor([kept_tokens(0.5, r) + int(r < 196) for r in counts])
    return keys.float().masked_fill(~valid[..., None], 1.0), valid, k


def clustering_table(vit, image, device, runs) -> list[str]:
    metric, valid, k = window_inputs(vit, image)
    fast = "triton" if device.type == "cuda" else "native"
    lines = [f"| linkage | windows x tokens | torch path (ms) | {fast} (ms) | speedup |", "|---|---|---|---|---|"]
    for linkage in LINKAGES:
        slow_time, fast_time = interleaved([functools.partial(
            agglomerative_clustering, metric, k, linkage, valid=valid, backend=backend)
            for backend in ("torch", fast)], device, runs)
        lines.append(f"| {linkage} | {metric.shape[0]} x {metric.shape[1]} | {slow_time * 1e3:.2f} "
                     f"| {fast_time * 1e3:.3f} | {slow_time / fast_time:.1f}x |")
    return lines


def sync_free(model, image, device) -> str:
    """Whether a forward passes ``torch.cuda.set_sync_debug_mode("error")`` (GPU only)."""
    if device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(image)
        return "yes"
    except RuntimeError as error:
        return f"no ({str(error).splitlines()[0][:60]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def peak_memory(fn, device) -> str:
    """MiB the call ``fn()`` allocates at its peak above what was allocated before it (GPU)."""
    if device.type != "cuda":
        return "-"
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return f"{(torch.cuda.max_memory_allocated() - before) / 2**20:.0f}"


def dynamo_counts() -> tuple[int, int]:
    """(graph breaks, cudagraph skips) counted by Dynamo / inductor so far in this process."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["inductor"]["cudagraph_skips"]


class Variant:
    """One row's model: ``name``, the module, its ``mode`` ("eager", "compiled", "graphs") and
    ``peer`` (the row it is compared with). ``call`` runs it; ``error`` says why it does not."""

    def __init__(self, name: str, module, mode: str, peer: str) -> None:
        self.name, self.module, self.mode, self.peer = name, module, mode, peer
        self.call = module if mode == "eager" else None
        self.error: str | None = None

    def compile(self, image, device) -> str:
        """Compiles (``torch.compile``; mode ``reduce-overhead`` for graphs) on the first use and
        makes the first call at this input's shape and dtype; returns the compile table's cells:
        seconds of that call, graph breaks and CUDA-graph skips during it, status."""
        breaks, skips = dynamo_counts()
        start = time.perf_counter()
        self.error = None
        try:
            if self.call is None:
                compiled = torch.compile(self.module, mode="reduce-overhead" if self.mode == "graphs" else None)
                self.call = compiled if self.mode == "compiled" else functools.partial(graph_step, compiled)
            self.call(image)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001  (a model that does not compile is a finding)
            self.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:80]}" \
                if str(error).strip() else type(error).__name__
        seconds = time.perf_counter() - start
        new_breaks, new_skips = dynamo_counts()
        status = f"failed ({self.error})" if self.error else "ok"
        return (f"{self.name} | {self.mode} | {seconds:.1f} | {new_breaks - breaks} | "
                f"{new_skips - skips if self.mode == 'graphs' else '-'} | {status}")


def graph_step(compiled, image):
    """One call of a ``reduce-overhead`` model: a new CUDA-graph step, then the replay."""
    torch.compiler.cudagraph_mark_step_begin()
    return compiled(image)


def variants(models: list[tuple[str, torch.nn.Module]], peer: str, device, compile_models: bool) -> list[Variant]:
    """The eager rows of ``models`` and, with ``compile_models``, their compiled rows (and CUDA
    graph rows on a GPU); the stock model without SDPA is not compiled."""
    rows = [Variant(name, module, "eager", peer) for name, module in models]
    if compile_models:
        modes = ["compiled"] + (["graphs"] if device.type == "cuda" else [])
        rows += [Variant(f"{name} ({mode})", module, mode, f"{peer} ({mode})") for mode in modes
                 for name, module in models if name != "stock"]
    return rows


def backbone_models(size, device, keep_rates) -> tuple[list, str]:
    stock = vitdet_b(size).to(device)
    fast = apply_fast_attention(copy.deepcopy(stock))
    return [("stock", stock), ("stock + SDPA", fast)] + [
        (f"ATC keep {keep}", apply_atc(copy.deepcopy(fast), keep_rate=keep, linkage="average"))
        for keep in keep_rates], "stock + SDPA"


def sam_models(size, device, keep_rates) -> tuple[list, str | None]:
    """SAM's ViT-B image encoder, stock and with ATC at each keep rate, or ([], why not)."""
    try:
        from segment_anything.modeling.image_encoder import ImageEncoderViT
    except ImportError as error:
        return [], f"segment_anything does not import ({error})"
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=size, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                              mlp_ratio=4, out_chans=256, qkv_bias=True,
                              norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
                              use_rel_pos=True, window_size=14, global_attn_indexes=(2, 5, 8, 11))
    encoder = encoder.eval().to(device)
    try:
        reduced = [(f"SAM ATC keep {keep}", apply_any(copy.deepcopy(encoder), keep_rate=keep, linkage="average"))
                   for keep in keep_rates]
    except (TypeError, ValueError, NotImplementedError) as error:
        return [], f"atc_det.apply_atc has no adapter for SAM's ImageEncoderViT ({str(error)[:100]})"
    return [("SAM stock", encoder)] + reduced, None


def model_table(rows: list[Variant], size, batches, dtypes, device, runs) -> tuple[list[str], list[str]]:
    """The timing table's lines and the compile table's lines of ``rows``: for each batch and
    dtype, the eager rows timed (interleaved), then the compiled rows compiled, then timed."""
    lines = ["| batch | dtype | model | time (ms) | vs peer | clustering (ms) | clustering share "
             "| peak memory (MiB) | sync-free |", "|---|---|---|---|---|---|---|---|---|"]
    compile_lines = []
    print("\n".join(lines), flush=True)
    for batch in batches:
        image = smooth_image(size).repeat(batch, 1, 1, 1).to(device)
        for dtype in dtypes:
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
            with torch.no_grad(), autocast:
                eager = [row for row in rows if row.mode == "eager"]
                lines += time_rows(eager, image, f"| {batch} | {dtype} |", device, runs)
                compiled = [row for row in rows if row.mode != "eager"]
                for row in compiled:
                    compile_lines.append(f"| {batch} | {dtype} | {row.compile(image, device)} |")
                    print(compile_lines[-1], flush=True)
                lines += time_rows(compiled, image, f"| {batch} | {dtype} |", device, runs)
    return lines, compile_lines


def time_rows(rows: list[Variant], image, prefix: str, device, runs) -> list[str]:
    """One table line per row (``prefix``: the batch and dtype cells), printed as it comes."""
    live = [row for row in rows if row.error is None]
    warmup = 3 if any(row.mode == "graphs" for row in live) else 1
    seconds = dict(zip([row.name for row in live], interleaved(
        [functools.partial(row.call, image) for row in live], device, runs, warmup)))
    lines = []
    for row in rows:
        if row.error is not None:
            lines.append(f"{prefix} {row.name} | failed | - | - | - | - | - |")
            print(lines[-1], flush=True)
            continue
        cluster, synced = None, "-"
        memory = peak_memory(functools.partial(row.call, image), device)
        if row.mode == "eager" and "ATC" in row.name:
            recorder = ClusteringCalls()
            with recorder:
                row.module(image)
            cluster = interleaved([recorder.replay], device, runs)[0]
            synced = sync_free(row.module, image, device)
        peer = seconds.get(row.peer)
        speed = f"{peer / seconds[row.name]:.2f}x" if peer and row.name != row.peer else "-"
        lines.append(f"{prefix} {row.name} | {seconds[row.name] * 1e3:.1f} | {speed} | "
                     f"{'-' if cluster is None else f'{cluster * 1e3:.2f}'} | "
                     f"{'-' if cluster is None else f'{cluster / seconds[row.name]:.1%}'} | {memory} | {synced} |")
        print(lines[-1], flush=True)
    return lines


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return f"{model or platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--size", type=int, default=1024, help="image size (multiple of 16)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bf16"], choices=["float32", "bf16"])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--keep", type=float, nargs="+", default=list(KEEP_RATES),
                        help="ATC keep rates of the model rows (default 0.75 0.5 0.25)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compiled rows (default: on CUDA yes, on the CPU no)")
    parser.add_argument("--sam", action=argparse.BooleanOptionalAction, default=True,
                        help="SAM encoder rows where segment_anything and an ATC adapter exist")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible to torch; pass --device cpu")
    if args.size < 16 or args.size % 16:
        parser.error(f"--size must be a positive multiple of 16, got {args.size}")
    if args.runs < 1 or min(args.batch) < 1:
        parser.error(f"--runs and --batch must be at least 1, got {args.runs} and {args.batch}")
    if not all(0 < keep <= 1 for keep in args.keep):
        parser.error(f"--keep rates must lie in (0, 1], got {args.keep}")
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out: folder {args.out.parent} does not exist")
    device = torch.device(args.device)
    compile_models = device.type == "cuda" if args.compile is None else args.compile
    torch._dynamo.config.recompile_limit = 64  # every model, batch and dtype compiles its own graphs
    torch._dynamo.config.automatic_dynamic_shapes = False  # static shapes: one graph per input shape
    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    lines = [f"# ATC on {name}", "",
             f"torch {torch.__version__}, {args.size}x{args.size}, median of {args.runs} runs after "
             f"warm-up, models interleaved; command: "
             f"`{' '.join(['python', 'benchmarks/bench_gpu.py', *sys.argv[1:]])}`", "",
             "## Clustering of one block's windows (K = half)", ""]
    vit = vitdet_b(args.size).to(device)
    image = smooth_image(args.size).to(device)
    lines += clustering_table(vit, image, device, args.runs)
    del vit
    print("\n".join(lines), flush=True)
    lines += ["", "## ViT-B backbone", "",
              "vs peer: against stock + SDPA in the same mode (eager, compiled, graphs = "
              "torch.compile mode reduce-overhead); clustering: the op calls of one eager forward, "
              "timed again on the same windows; peak memory: above what was allocated before the "
              "forward.", ""]
    models, peer = backbone_models(args.size, device, args.keep)
    table, compile_lines = model_table(variants(models, peer, device, compile_models), args.size,
                                       args.batch, args.dtype, device, args.runs)
    lines += table
    if args.sam:
        sam, why_not = sam_models(args.size, device, args.keep)
        lines += ["", "## SAM ViT-B image encoder", ""]
        if why_not:
            lines.append(f"Not run: {why_not}.")
            print(lines[-1], flush=True)
        else:
            sam_table, sam_compile = model_table(variants(sam, "SAM stock", device, compile_models),
                                                 args.size, args.batch, args.dtype, device, args.runs)
            lines += sam_table
            compile_lines += sam_compile
    if compile_lines:
        lines += ["", "## Compilation", "", "First call of each compiled model (compile included), "
                  "graph breaks and CUDA-graph skips counted by Dynamo / inductor during it.", "",
                  "| batch | dtype | model | mode | first call (s) | graph breaks | cudagraph skips | status |",
                  "|---|---|---|---|---|---|---|---|"] + compile_lines
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
