"""SecViT-T/S/B/L classifier parameters and FLOPs at 224x224 against the paper.

    OMP_NUM_THREADS=2 flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_secvit_flops.py

(ViTDet-B with SEC at 1024x1024: ``benchmarks/bench_vitdet_backbone.py --sec``, beside ATC.)

Parameters: ``sum(p.numel())`` of the 1000-class classifier (head included), as the paper.
FLOPs: fvcore ``FlopCountAnalysis`` in eval mode, batch 1 (one multiply-add = one flop, fvcore's
convention). "all" counts every op fvcore supports (convs, norms, pooling, matmuls); "no attn"
leaves out ``aten::matmul``, which in SecViT is only the attention products q k^T and attn v;
SEC's sort and gathers are not counted (fvcore skips them).
"""
import argparse

import torch
from fvcore.nn import FlopCountAnalysis

from atc_det.modeling.secvit_backbone import SECVIT_PAPER, secvit_classifier


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.parse_args()
    secvit_table()


if __name__ == "__main__":
    main()
