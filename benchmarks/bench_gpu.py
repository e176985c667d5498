"""GPU benchmark of ATC in ViTDet-B, one script, one markdown report (also runs on the CPU).

    .venv/bin/python benchmarks/bench_gpu.py                      # on a GPU: about 3 minutes
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --size 224 --batch 1 --runs 1 --dtype float32

1. Clustering of one ViTDet-B block's windows (block 1's attention keys, heads averaged, on a
   fixed smooth image; 25 windows of 196 tokens at 1024x1024, edge and corner windows padded;
   K = half of each window's real tokens + its padding cluster), each linkage: the torch path
   against the Triton kernel (on the CPU: against the native kernel), median time of ``--runs``
   calls after warm-up (CUDA events on a GPU).
2. The ViT-B backbone (random weights) at ``--size``, each batch size and dtype (float32, bf16
   autocast): stock Detectron2, stock with SDPA attention (``apply_fast_attention``), ATC at
   keep 0.75 / 0.5 / 0.25 (average linkage, blocks 1-11, on top of the SDPA attention):
   median forward time, speedup against stock + SDPA, the clustering calls' time and share,
   peak memory (GPU), and whether ``torch.cuda.set_sync_debug_mode("error")`` lets a forward
   pass (no host synchronisation).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from atc_det import clustering  # noqa: E402
from atc_det.clustering import agglomerative_clustering  # noqa: E402
from atc_det.modeling import apply_atc, apply_fast_attention  # noqa: E402
from atc_det.modeling.atc_vit import group_tokens, window_real_counts  # noqa: E402
from atc_det.reduction import head_mean_keys, kept_tokens  # noqa: E402
from benchmarks.bench_vitdet_backbone import smooth_image, vitdet_b  # noqa: E402
from detectron2.modeling.backbone.utils import get_abs_pos  # noqa: E402

LINKAGES = ("single", "complete", "average")
KEEP_RATES = (0.75, 0.5, 0.25)


def elapsed(fn, device: torch.device, runs: int) -> float:
    """Median seconds of ``fn()`` over ``runs`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class ClusteringTimer:
    """Sums the time of every ``agglomerative_clustering`` call of the reduced blocks (CUDA
    events on a GPU, read after the forward: no synchronisation inside it)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.pairs, self.seconds = device, [], 0.0

    @contextlib.contextmanager
    def active(self):
        original = clustering.agglomerative_clustering

        def timed(*args, **kwargs):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = original(*args, **kwargs)
                end.record()
                self.pairs.append((start, end))
                return out
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return out

        clustering.agglomerative_clustering = timed  # the registry looks the method up per call
        try:
            yield self
        finally:
            clustering.agglomerative_clustering = original

    def total(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.pairs) / 1e3
        return self.seconds


def window_inputs(vit, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block 1's clustering input: metric [25, 196, 64], valid [25, 196], K [25] (CPU)."""
    with torch.no_grad():
        x = vit.patch_embed(image)
        x = x + get_abs_pos(vit.pos_embed, vit.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
        x = vit.blocks[0](x)
        block = vit.blocks[1]
        tokens, valid, _, _ = group_tokens(x, 14)
        keys = head_mean_keys(block.norm1(tokens) * valid[..., None], block.attn.qkv.weight,
                              block.attn.qkv.bias, block.attn.num_heads)
    counts = window_real_counts(x.shape[1], x.shape[2], 14) * image.shape[0]
    k = torch.tensor([kept_tokens(0.5, r) + int(r < 196) for r in counts])
    return keys.float().masked_fill(~valid[..., None], 1.0), valid, k


def clustering_table(vit, image, device, runs) -> list[str]:
    metric, valid, k = window_inputs(vit, image)
    fast = "triton" if device.type == "cuda" else "native"
    lines = [f"| linkage | windows x tokens | torch path (ms) | {fast} (ms) | speedup |", "|---|---|---|---|---|"]
    for linkage in LINKAGES:
        times = {backend: elapsed(lambda b=backend: agglomerative_clustering(
            metric, k, linkage, valid=valid, backend=b), device, runs) for backend in ("torch", fast)}
        lines.append(f"| {linkage} | {metric.shape[0]} x {metric.shape[1]} | {times['torch'] * 1e3:.2f} "
                     f"| {times[fast] * 1e3:.3f} | {times['torch'] / times[fast]:.1f}x |")
    return lines


def sync_free(model, image, device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            model(image)
        torch.cuda.set_sync_debug_mode("default")
        return "yes"
    except RuntimeError as error:
        torch.cuda.set_sync_debug_mode("default")
        return f"no ({str(error).splitlines()[0][:60]})"


def backbone_table(size, batches, dtypes, device, runs) -> list[str]:
    stock = vitdet_b(size).to(device)
    fast = apply_fast_attention(copy.deepcopy(stock))
    models = [("stock", stock), ("stock + SDPA", fast)] + [
        (f"ATC keep {keep}", apply_atc(copy.deepcopy(fast), keep_rate=keep, linkage="average"))
        for keep in KEEP_RATES]
    lines = ["| batch | dtype | model | time (ms) | vs stock + SDPA | clustering (ms) | clustering share "
             "| peak memory (MiB) | sync-free |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for batch in batches:
        image = smooth_image(size).repeat(batch, 1, 1, 1).to(device)
        for dtype in dtypes:
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
            reference = None
            for name, model in models:
                timer = ClusteringTimer(device)
                with torch.no_grad(), autocast:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    seconds = elapsed(lambda m=model: m(image), device, runs)
                    with timer.active():
                        model(image)
                    memory = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device.type == "cuda" else "-"
                    synced = sync_free(model, image, device) if name.startswith("ATC") else "-"
                cluster = timer.total() if name.startswith("ATC") else None
                reference = seconds if name == "stock + SDPA" else reference
                speed = f"{reference / seconds:.2f}x" if reference else "-"
                lines.append(
                    f"| {batch} | {dtype} | {name} | {seconds * 1e3:.1f} | {speed} | "
                    f"{'-' if cluster is None else f'{cluster * 1e3:.2f}'} | "
                    f"{'-' if cluster is None else f'{cluster / seconds:.1%}'} | {memory} | {synced} |")
                print(lines[-1], flush=True)
    return lines


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return f"{model or platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--size", type=int, default=1024, help="image size (multiple of 16)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bf16"], choices=["float32", "bf16"])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        print(f"error: --device must be cuda or cpu, got {args.device!r}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible to torch; pass --device cpu", file=sys.stderr)
        return 2
    if args.size < 16 or args.size % 16:
        print(f"error: --size must be a positive multiple of 16, got {args.size}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    header = [f"# ATC on {name}", "",
              f"torch {torch.__version__}, {args.size}x{args.size}, median of {args.runs} runs after "
              f"warm-up; command: `{' '.join(['python', 'benchmarks/bench_gpu.py', *sys.argv[1:]])}`", "",
              "## Clustering of one block's windows (K = half)", ""]
    vit = vitdet_b(args.size).to(device)
    image = smooth_image(args.size).to(device)
    lines = header + clustering_table(vit, image, device, args.runs)
    print("\n".join(lines), flush=True)
    lines += ["", "## ViT-B backbone", ""]
    print("\n".join(lines[-3:]), flush=True)
    lines += backbone_table(args.size, args.batch, args.dtype, device, args.runs)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
