"""Time ATC's batched agglomerative clustering against per-sample library loops.

Every method starts from the same [B, N, C] float32 token features and ends with [B, N] labels:
  * atc:        ``atc_det.clustering.agglomerative_clustering`` (cosine distance inside), default
                backend on CPU: the native C++ kernel (``atc_det/csrc/rnn_rounds.cpp``).
  * atc-torch:  the same with ``backend="torch"`` (the batched tensor-op path, also for GPUs).
  * sklearn:    cosine-distance matrix in torch, then a per-sample
                ``AgglomerativeClustering(metric="precomputed")`` loop (as the official ATC code).
  * scipy:      same matrix, per-sample ``scipy.cluster.hierarchy.linkage`` + ``fcluster``.
  * fastcluster: same matrix, per-sample ``fastcluster.linkage`` + SciPy ``fcluster``.
Reports the median wall time of ``--repeats`` runs and the speed-up of atc over each loop.

    OMP_NUM_THREADS=2 python benchmarks/bench_clustering.py --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial
from typing import Callable

import fastcluster
import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import squareform
from sklearn.cluster import AgglomerativeClustering

from atc_det.clustering import agglomerative_clustering, cosine_distances

CASES = (  # name, B, N, C, K values
    ("ViTDet-B windows", 25, 196, 64, (98, 49)),
    ("global block", 1, 4096, 64, (2048, 1024)),
)


def _condensed(metric: torch.Tensor) -> list[np.ndarray]:
    dist = cosine_distances(metric).double().numpy()
    return [squareform(d, checks=False) for d in dist]


def run_atc(metric: torch.Tensor, k: int, linkage: str, backend: str) -> np.ndarray:
    return agglomerative_clustering(metric, k, linkage, backend=backend).numpy()


def run_sklearn(metric: torch.Tensor, k: int, linkage: str) -> np.ndarray:
    dist = cosine_distances(metric).numpy()
    model = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage)
    return np.stack([model.fit_predict(d) for d in dist])


def run_scipy(metric: torch.Tensor, k: int, linkage: str) -> np.ndarray:
    return np.stack([fcluster(scipy_linkage(d, method=linkage), k, "maxclust")
                     for d in _condensed(metric)])


def run_fastcluster(metric: torch.Tensor, k: int, linkage: str) -> np.ndarray:
    return np.stack([fcluster(fastcluster.linkage(d, method=linkage), k, "maxclust")
                     for d in _condensed(metric)])


METHODS: dict[str, Callable[[torch.Tensor, int, str], np.ndarray]] = {
    "atc": partial(run_atc, backend="native"), "atc-torch": partial(run_atc, backend="torch"),
    "sklearn": run_sklearn, "scipy": run_scipy, "fastcluster": run_fastcluster,
}


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return all(((x[:, None] == x[None, :]) == (y[:, None] == y[None, :])).all() for x, y in zip(a, b))


def median_time(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median)")
    parser.add_argument("--global-repeats", type=int, default=1, help="timed runs, global block")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"{platform.processor() or platform.platform()}")
    print("| case | linkage | K | atc ms | atc-torch ms | sklearn ms | scipy ms | fastcluster ms "
          "| atc vs sklearn | atc vs fastcluster | same partition |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, batch, tokens, channels, ks in CASES:
            metric = torch.randn(batch, tokens, channels)
            repeats = args.repeats if tokens < 1000 else args.global_repeats
            for linkage in ("single", "complete", "average"):
                for k in ks:
                    ms, labels = {}, {}
                    for method, fn in METHODS.items():
                        t, labels[method] = median_time(lambda: fn(metric, k, linkage), repeats)
                        ms[method] = 1e3 * t
                    same = _same_partition(labels["atc"], labels["scipy"]) and \
                        _same_partition(labels["atc-torch"], labels["scipy"])
                    print(f"| {name} ({batch}x{tokens}, C={channels}) | {linkage} | {k} "
                          f"| {ms['atc']:.1f} | {ms['atc-torch']:.1f} | {ms['sklearn']:.1f} | {ms['scipy']:.1f} "
                          f"| {ms['fastcluster']:.1f} | {ms['sklearn'] / ms['atc']:.1f}x "
                          f"| {ms['fastcluster'] / ms['atc']:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
