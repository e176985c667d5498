"""Peak memory and time of one training step (forward + backward) of the ViTDet-B backbone:
stock Detectron2, stock with SDPA attention, ATC keep 0.5 and 0.25 (on top of SDPA attention).

    OMP_NUM_THREADS=2 flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_memory.py --size 768

Each model runs in a fresh subprocess (random weights, train mode, drop path 0.1 as in the
official recipes, batch ``--batch`` of a fixed smooth image, loss = sum of the last feature map):
peak memory of the first step: on the CPU the growth of the process's peak resident set
(``ru_maxrss``) over what the built model and input held, on a GPU
``torch.cuda.max_memory_allocated`` over the allocated memory before the step; time of a second
step. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("stock (Detectron2)", "stock + SDPA", "ATC keep 0.5", "ATC keep 0.25")


def run_one(name: str, size: int, batch: int, device: str) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from atc_det.modeling import apply_atc, apply_fast_attention
    from benchmarks.bench_vitdet_backbone import smooth_image, vitdet_b

    model = vitdet_b(size)
    model.train()
    for block in model.blocks:  # the official recipes' drop path
        block.drop_path.drop_prob = 0.1
    if name != MODELS[0]:
        apply_fast_attention(model)
    if name.startswith("ATC"):
        apply_atc(model, keep_rate=float(name.rsplit(" ", 1)[1]), linkage="average")
    model = model.to(device)
    image = smooth_image(size).repeat(batch, 1, 1, 1).to(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(image)["last_feat"].sum().backward()

    # Memory of the first step over what the model and input hold; time of a second step.
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return dict(name=name, seconds=time.perf_counter() - start, peak_mib=peak / 2**20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model, print JSON
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.size, args.batch, args.device)))
        return 0
    rows = []
    for name in MODELS:
        result = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--batch",
                                 str(args.batch), "--device", args.device, "--one", name],
                                capture_output=True, text=True)
        if result.returncode != 0:
            print(f"error: {name} failed: {result.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            return 1
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    reference = rows[1]
    print(f"ViTDet-B backbone, one training step (forward + backward), batch {args.batch}, "
          f"{args.size}x{args.size}, device {args.device}\n")
    print("| model | step time (s) | peak memory of the step (MiB) | vs stock + SDPA |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['seconds']:.1f} | {row['peak_mib']:.0f} | "
              f"{row['peak_mib'] / reference['peak_mib']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
