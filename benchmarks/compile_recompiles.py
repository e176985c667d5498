"""How many compilations and graph breaks a reduced Detectron2 ViT costs under ``torch.compile``.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compile_recompiles.py      # Markdown on stdout

A small ViTDet ``ViT`` (img_size 448, patch 16, embed 64, depth 3, 4 heads, windows of 14 in
blocks 0 and 2, rel-pos, random weights) with ATC keep 0.5 / 0.25 in blocks 1 and 2. Dynamo
counts compiled frames (``torch._dynamo.testing.CompileCounter`` as the backend, so nothing is
code-generated): each table cell is the number of frames compiled so far after that call; the
last column counts Dynamo's "hit config.recompile_limit" warnings (that frame then runs eagerly).

1. Dense mode (fixed K per window), ``dynamic=False / True / None``: sizes 320x448, 448x448,
   320x448 again, then other images of the seen sizes.
2. Threshold mode (``threshold=0.3``, K from the data): each clustering block reads its cluster
   counts back to the host (``.tolist()`` in ``atc_det.reduction.cluster_tokens``), a graph
   break; ``torch._dynamo.explain`` counts graphs (its break count is graphs - 1) and the
   reasons, with the atc_det line where each break happens, then a sequence of images at one
   size shows what a new K costs (the K of each clustering block, from an eager forward).
3. The baseline methods (tome, kmedoids, dpcknn, random) and ATC at keep 0.5: graph breaks by
   ``torch._dynamo.explain``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch
from detectron2.modeling import ViT
from torch._dynamo.testing import CompileCounter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import atc_det  # noqa: E402
from atc_det import vitdet_block  # noqa: E402  (the reduced block looks cluster_tokens up here)
from benchmarks.fixtures.machine import machine  # noqa: E402

DYNAMIC = (False, True, None)
# (height, width, seed): two sizes, the first again, then new images of seen sizes.
DENSE_CALLS = [(320, 448, 0), (448, 448, 0), (320, 448, 0), (320, 448, 1), (448, 448, 2), (320, 448, 3)]
THRESHOLD_CALLS = [(320, 448, seed) for seed in range(6)] + [(448, 448, 0), (448, 448, 1)]
BASELINES = ("atc", "tome", "kmedoids", "dpcknn", "random")


def small_vit() -> ViT:
    torch.manual_seed(0)
    return ViT(img_size=448, patch_size=16, embed_dim=64, depth=3, num_heads=4, window_size=14,
               window_block_indexes=[0, 2], use_rel_pos=True, drop_path_rate=0.0).eval()


def reduced(**settings) -> ViT:
    settings = {"keep_rate": [0.5, 0.25], **settings}
    return atc_det.apply_atc(small_vit(), blocks=[1, 2], **settings)


def image(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def frames_per_call(model: ViT, calls: list, dynamic: bool | None) -> tuple[list[int], int]:
    """Frames compiled so far after each call of ``calls`` ((height, width, seed)), and how often
    Dynamo hit its recompile limit (``torch._dynamo.config.recompile_limit``) on the way."""
    torch._dynamo.reset()
    counter, hits = CompileCounter(), RecompileLimitHits()
    compiled = torch.compile(model, backend=counter, dynamic=dynamic)
    frames = []
    logger = logging.getLogger("torch._dynamo.convert_frame")
    logger.addHandler(hits)
    try:
        with torch.no_grad():
            for height, width, seed in calls:
                compiled(image(height, width, seed))
                frames.append(counter.frame_count)
    finally:
        logger.removeHandler(hits)
    return frames, hits.count


def explain(model: ViT, x: torch.Tensor):
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._dynamo.explain(model)(x)


def cluster_counts(model: ViT, x: torch.Tensor) -> list[int]:
    """K (cluster slots per group, the largest group's) of each clustering call of an eager
    forward."""
    slots, original = [], vitdet_block.cluster_tokens

    def recorded(*args, **kwargs):
        part = original(*args, **kwargs)
        slots.append(part.num_slots)
        return part

    vitdet_block.cluster_tokens = recorded
    try:
        with torch.no_grad():
            model(x)
    finally:
        vitdet_block.cluster_tokens = original
    return slots


def reasons(explanation) -> str:
    """The distinct graph-break reasons (first line, and the innermost atc_det line of the user
    stack) with their counts."""
    counts: dict[str, int] = {}
    for reason in explanation.break_reasons:
        line = str(reason.reason).strip().splitlines()[0][:70]
        frames = [f for f in reason.user_stack if "atc_det" in f.filename]
        if frames:
            where = frames[-1]
            line += f" at {where.filename.split('atc_det/')[-1]}:{where.lineno} `{(where.line or '').strip()}`"
        counts[line] = counts.get(line, 0) + 1
    return "; ".join(f"{n} x {line}" for line, n in counts.items()) or "-"


class RecompileLimitHits(logging.Handler):
    """Counts Dynamo's "hit config.recompile_limit" warnings (the frame then runs eagerly)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "recompile_limit" in record.getMessage()


def call_label(height: int, width: int, seed: int) -> str:
    return f"{height}x{width} #{seed}"


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter).parse_args()
    print(f"Small ViTDet (448, patch 16, embed 64, depth 3, 4 heads, windows in blocks 0 and 2, "
          f"rel-pos), ATC keep [0.5, 0.25] in blocks [1, 2]; {machine()}. Cells: frames compiled "
          f"so far (CompileCounter).\n")

    print("Dense mode (fixed K per window), frames after each call:\n")
    print("| dynamic | " + " | ".join(call_label(*c) for c in DENSE_CALLS) + " | recompile limit hit |")
    print("|---|" + "---|" * (len(DENSE_CALLS) + 1))
    for dynamic in DYNAMIC:
        frames, hits = frames_per_call(reduced(), DENSE_CALLS, dynamic)
        print(f"| {dynamic} | " + " | ".join(map(str, frames)) + f" | {hits} |", flush=True)

    model = reduced(threshold=0.3)
    explanation = explain(model, image(*THRESHOLD_CALLS[0]))
    print(f"\nThreshold mode (threshold 0.3), torch._dynamo.explain at 320x448: "
          f"{explanation.graph_count} graphs, {explanation.graph_break_count} graph breaks "
          f"({reasons(explanation)})\n")
    ks = [cluster_counts(model, image(*c)) for c in THRESHOLD_CALLS]
    print("| dynamic | " + " | ".join(f"{call_label(*c)}, K {k}" for c, k in zip(THRESHOLD_CALLS, ks))
          + " | recompile limit hit |")
    print("|---|" + "---|" * (len(THRESHOLD_CALLS) + 1))
    for dynamic in DYNAMIC:
        frames, hits = frames_per_call(model, THRESHOLD_CALLS, dynamic)
        print(f"| {dynamic} | " + " | ".join(map(str, frames)) + f" | {hits} |", flush=True)

    print("\nMethods at keep 0.5 (dense mode), torch._dynamo.explain at 320x448:\n")
    print("| method | graphs | graph breaks | reasons |")
    print("|---|---|---|---|")
    for method in BASELINES:
        explanation = explain(reduced(keep_rate=0.5, method=method), image(*DENSE_CALLS[0]))
        print(f"| {method} | {explanation.graph_count} | {explanation.graph_break_count} | "
              f"{reasons(explanation)} |", flush=True)


if __name__ == "__main__":
    main()
