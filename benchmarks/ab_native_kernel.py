"""Interleaved A/B timing of the native clustering kernel: a git revision against the working tree.

Both kernel sources (``atc_det/csrc/rnn_rounds.cpp`` at ``--base`` and in the working tree, or
``--candidate FILE``) are compiled with the flags of :mod:`atc_det.clustering.native` and called in
alternation through ``atc_det.clustering.native.cluster`` on the same features (the ViTDet-B window case of
``bench_clustering.py``: 25 windows x 196 tokens, C=64, each linkage, K=98 and 49), so that the
drift of a shared machine hits both alike. Prints each version's median time and the ratio
(candidate / base: below 1 is faster). First it checks that both give the same labels on
``--check-cases`` random batches per dtype (float32 and float64; random N, C, batch size and
number of merges, every linkage; every third case with features rounded to halves, so that
distances tie), and prints how many differ. Both versions must have the kernel's C ABI of the
working tree (``num_merges`` as a per-sample array, since the Triton backend's commit).

    OMP_NUM_THREADS=2 python benchmarks/ab_native_kernel.py --base HEAD~1
"""

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from atc_det.clustering import native

REPOSITORY = Path(__file__).resolve().parents[1]


def check_labels(libraries: dict, cases: int, seed: int) -> None:
    """Print how many calls of the two kernels gave different labels on the same random input."""
    generator = torch.Generator().manual_seed(seed)

    def draw(high: int) -> int:
        return int(torch.randint(1, high, (1,), generator=generator))

    for dtype in (torch.float32, torch.float64):
        calls = differ = 0
        for case in range(cases):
            features = torch.randn(draw(5), draw(300), draw(70), generator=generator, dtype=dtype)
            if case % 3 == 0:
                features = torch.round(features * 2) / 2
            for linkage in native.LINKAGE_CODES:
                merges = draw(features.shape[1] + 1) - 1
                merges = torch.full((features.shape[0],), merges)
                base, candidate = (native.cluster(linkage, merges, None, None, features=features,
                                                  library=libraries[name]) for name in ("base", "candidate"))
                calls += 1
                differ += not torch.equal(base, candidate)
        print(f"labels: {differ} of {calls} {dtype} calls differ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision of the base kernel")
    parser.add_argument("--candidate", type=Path, default=native.SOURCE, help="candidate kernel source")
    parser.add_argument("--pairs", type=int, default=150, help="timed calls per version and cell")
    parser.add_argument("--check-cases", type=int, default=300,
                        help="random batches per dtype on which the labels are compared")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    source = subprocess.run(["git", "show", f"{args.base}:atc_det/csrc/rnn_rounds.cpp"], cwd=REPOSITORY,
                            capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        base_source = Path(tmp) / "base.cpp"
        base_source.write_text(source)
        libraries = {}
        for name, path in (("base", base_source), ("candidate", args.candidate)):
            native.compile_kernel(path, Path(tmp) / f"{name}.so")
            libraries[name] = native.load_library(Path(tmp) / f"{name}.so")
        check_labels(libraries, args.check_cases, args.seed)
        torch.manual_seed(args.seed)
        # Unit-norm features: kernels before 437e02b expected them (later ones normalise again).
        features = torch.nn.functional.normalize(torch.randn(25, 196, 64), dim=-1)
        print(f"base {args.base} vs candidate {args.candidate}; 25 x 196 tokens, C=64, "
              f"{torch.get_num_threads()} threads, median of {args.pairs} interleaved calls")
        print("| linkage | K | base ms | candidate ms | candidate / base |\n|---|---|---|---|---|")
        for linkage in native.LINKAGE_CODES:
            for clusters in (98, 49):
                times = {name: [] for name in libraries}
                for call in range(args.pairs + 1):
                    order = ("base", "candidate") if call % 2 else ("candidate", "base")
                    for name in order:
                        start = time.perf_counter()
                        native.cluster(linkage, torch.full((25,), 196 - clusters), None, None, features=features,
                                       library=libraries[name])
                        if call:  # the first round is a warm-up
                            times[name].append(time.perf_counter() - start)
                base, candidate = (statistics.median(times[name]) * 1e3 for name in ("base", "candidate"))
                print(f"| {linkage} | {clusters} | {base:.3f} | {candidate:.3f} | {candidate / base:.2f} |")


if __name__ == "__main__":
    main()
