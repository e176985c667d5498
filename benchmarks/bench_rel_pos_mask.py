"""Three ways to add merged tokens' relative positions to one global block's attention, timed
on the same inputs (12 heads, L cluster tokens, S = 64 lattice lines per axis, head dim 64).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_rel_pos_mask.py [--tokens 2048]

1. "matmul mask" (what ``atc_det.vitdet_block.rel_pos_mask`` does): mask = query terms
   [L, 2S + 1] x key weights [2S + 1, L] + SDPA at head dim 64;
2. "grid_sample mask": the key side read at each key's two lattice lines per axis
   (``grid_sample``, O(L^2) reads) + SDPA at head dim 64;
3. "widened q.k": q and k widened by the per-line terms / weights (head dim 64 + 2S) in SDPA,
   the key bias as a broadcast mask (the previous formula).
Prints the median of ``--runs`` calls of each (and checks that 1 and 2 build the same mask).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    heads, L, S, D = 12, args.tokens, 64, 64
    q, k, v = (torch.randn(1, heads, L, D) for _ in range(3))
    terms = torch.randn(1, heads, L, 2 * S)  # query terms of both axes
    coords = torch.rand(2, L) * (S - 1)  # key centroids (rows, cols)
    key_bias = torch.randn(1, L)
    lower = coords.floor()
    upper_weight = coords - lower
    weights = torch.zeros(1, L, 2 * S)
    for axis in range(2):
        weights[0].scatter_add_(1, (lower[axis].long() + axis * S)[:, None], (1 - upper_weight[axis])[:, None])
        weights[0].scatter_add_(1, ((lower[axis] + 1).clamp(max=S - 1).long() + axis * S)[:, None],
                                upper_weight[axis][:, None])

    def matmul_mask() -> torch.Tensor:
        ones = terms.new_ones(1, heads, L, 1)
        return torch.cat([terms, ones], -1) @ torch.cat([weights, key_bias[..., None]], -1)[:, None].mT

    def grid_sample_mask() -> torch.Tensor:
        mask = key_bias[:, None, None, :].expand(1, heads, L, L).clone()
        for axis in range(2):
            x = coords[axis] * (2 / (S - 1)) - 1
            where = torch.stack([x, torch.zeros_like(x)], -1)[None, None].expand(heads, 1, L, 2)
            table = terms[0, :, :, axis * S:(axis + 1) * S].reshape(heads, L, 1, S)
            mask += F.grid_sample(table, where, mode="bilinear", align_corners=True).view(1, heads, L, L)
        return mask

    widened_q = torch.cat([q * D ** -0.5, terms], -1)
    widened_k = torch.cat([k, weights[:, None].expand(1, heads, L, 2 * S)], -1)
    difference = (matmul_mask() - grid_sample_mask()).abs().max().item()
    rows = {
        "matmul mask + SDPA": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=matmul_mask()),
        "grid_sample mask + SDPA": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=grid_sample_mask()),
        "widened q.k in SDPA": lambda: F.scaled_dot_product_attention(
            widened_q, widened_k, v, attn_mask=key_bias[:, None, None, :], scale=1.0),
        "SDPA alone (no relative positions)": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    print(f"12 heads, L = {L}, S = {S}, head dim {D}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.runs}; matmul vs grid_sample mask: "
          f"max difference {difference:.1e}\n")
    print("| formulation | ms |\n|---|---|")
    for name, fn in rows.items():
        print(f"| {name} | {median_ms(fn, args.runs):.0f} |")


if __name__ == "__main__":
    main()
