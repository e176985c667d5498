"""SecViT-T/S/B/L classifier parameters and FLOPs at 224x224 against the paper, and (``--vitdet``)
the ViTDet-B backbone at 1024x1024 with SEC attention, in the ATC benchmark's setting.

    OMP_NUM_THREADS=2 flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_secvit_flops.py --vitdet

Parameters: ``sum(p.numel())`` of the 1000-class classifier (head included), as the paper.
FLOPs: fvcore ``FlopCountAnalysis`` in eval mode, batch 1 (one multiply-add = one flop, fvcore's
convention). "all" counts every op fvcore supports (convs, norms, pooling, matmuls); "no attn"
leaves out ``aten::matmul``, which in SecViT is only the attention products q k^T and attn v;
SEC's sort and gathers are not counted (fvcore skips them). The ViTDet-B rows reuse the model,
image and timing (median of ``--runs`` forwards after a warm-up) of bench_vitdet_backbone.py.
"""
import argparse
import copy

import torch
from bench_vitdet_backbone import measure, smooth_image, vitdet_b
from fvcore.nn import FlopCountAnalysis

from atc_det.modeling.sec_vit import apply_sec
from atc_det.modeling.secvit import SECVIT_PAPER, secvit_classifier

# (label, apply_sec keyword arguments) of the ViTDet-B rows; None: stock ViTDet.
VITDET_SEC_SETTINGS = [
    ("stock (14x14 windows + 4 global blocks)", None),
    ("SEC windowed blocks (groups of 196), global kept", dict(windowed=True, global_groups=1)),
    ("SEC windowed blocks + global blocks in 4 groups", dict(windowed=True, global_groups=4)),
    ("SEC global blocks in 4 groups, windows kept", dict(windowed=False, global_groups=4)),
]


def secvit_table() -> None:
    print("| model | params (M) | paper | diff | GFLOPs all | GFLOPs no attn | paper | diff (no attn) |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, (paper_params, paper_flops) in SECVIT_PAPER.items():
        model = secvit_classifier(variant).eval()
        params = sum(p.numel() for p in model.parameters())
        count = FlopCountAnalysis(model, torch.randn(1, 3, 224, 224))
        count.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_op = count.by_operator()
        total = sum(by_op.values())
        no_attn = total - by_op["matmul"]
        print(f"| SecViT-{variant} | {params / 1e6:.2f} | {paper_params / 1e6:.0f} "
              f"| {params / paper_params - 1:+.1%} | {total / 1e9:.2f} | {no_attn / 1e9:.2f} "
              f"| {paper_flops / 1e9:.1f} | {no_attn / paper_flops - 1:+.1%} |", flush=True)


def vitdet_table(size: int, runs: int) -> None:
    stock = vitdet_b(size)
    image = smooth_image(size)
    print(f"\nViTDet-B backbone, {size}x{size}, batch 1, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | GFLOPs (fvcore) | FLOP ratio | time (s) | speedup |")
    print("|---|---|---|---|---|")
    base_gflops = base_time = None
    for label, kwargs in VITDET_SEC_SETTINGS:
        model = stock if kwargs is None else apply_sec(copy.deepcopy(stock), **kwargs)
        gflops, seconds, _ = measure(model, image, runs)
        base_gflops, base_time = base_gflops or gflops, base_time or seconds
        print(f"| {label} | {gflops:.1f} | {gflops / base_gflops:.2f} | {seconds:.2f} "
              f"| {base_time / seconds:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--vitdet", action="store_true", help="also benchmark ViTDet-B with SEC")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    secvit_table()
    if args.vitdet:
        vitdet_table(args.size, args.runs)


if __name__ == "__main__":
    main()
