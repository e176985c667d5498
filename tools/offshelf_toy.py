#!/usr/bin/env python
"""Off-the-shelf token clustering on the trained toy ViTDet (no fine-tuning).

Evaluates the stock toy model, then the same weights with ATC (each linkage) and each baseline
(ToMe, K-Medoids, DPC-KNN) at several keep rates in blocks 1.., and with SEC grouping (which keeps
every token but restricts attention to equal-size groups), and writes a box / mask AP table
(Markdown + JSON) and a plot of AP against keep rate:

    python tools/train_net.py --config configs/toy_vitdet.yaml          # trains the toy model once
    OMP_NUM_THREADS=2 python tools/offshelf_toy.py --weights output/toy_vitdet/model_final.pth
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from detectron2.config import CfgNode  # noqa: E402

from atc_det.data.datasets import prepare_datasets  # noqa: E402
from atc_det.engine import Checkpointer, Trainer, exit_on_bad_input, load_config  # noqa: E402
from atc_det.modeling import apply_atc, apply_sec  # noqa: E402

# (label, METHOD, LINKAGE) of every clustering setting evaluated.
SETTINGS = [
    ("ATC single", "atc", "single"),
    ("ATC complete", "atc", "complete"),
    ("ATC average", "atc", "average"),
    ("ToMe", "tome", "average"),
    ("K-Medoids", "kmedoids", "average"),
    ("DPC-KNN", "dpcknn", "average"),
]
MEAN_REL_POS = "ATC average, member-mean rel-pos"
# (label, apply_sec keyword arguments): SEC keeps all tokens (plotted at keep rate 1.0).
SEC_SETTINGS = [
    ("SEC windowed (groups of the window size)", dict(windowed=True, global_groups=1)),
    ("SEC windowed + global in 2 groups", dict(windowed=True, global_groups=2)),
    ("SEC windowed + global in 4 groups", dict(windowed=True, global_groups=4)),
    ("SEC global in 4 groups", dict(windowed=False, global_groups=4)),
]


def evaluate(cfg, weights: str, patch: Callable[..., object] | None, kwargs: dict,
             stock_features: list[torch.Tensor]) -> dict:
    """Box and mask AP of the toy model with ``patch(vit, **kwargs)`` applied (``apply_atc`` or
    ``apply_sec``; None: stock), and the mean relative error of its backbone features against
    ``stock_features`` (filled by the stock run)."""
    model = Trainer.build_model(cfg)
    Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(weights, resume=False)
    stock = patch is None
    if not stock:
        patch(model.backbone.net, **kwargs)
    errors: list[float] = []

    def compare(module, inputs, outputs) -> None:
        feature = outputs["last_feat"].detach()
        if stock:
            stock_features.append(feature)
        else:
            reference = stock_features[len(errors)]
            errors.append(float((feature - reference).norm() / reference.norm()))

    hook = model.backbone.net.register_forward_hook(compare)
    start = time.perf_counter()
    results = Trainer.test(cfg, model)
    seconds = time.perf_counter() - start
    hook.remove()
    return {"box_ap": results["bbox"]["AP"], "mask_ap": results["segm"]["AP"],
            "feature_error": sum(errors) / len(errors) if errors else 0.0, "eval_s": seconds}


def plot(rows: list[dict], keep_rates: list[float], path: str) -> None:
    """Box AP, mask AP and feature error against keep rate, one line per method."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    stock = next(r for r in rows if r["method"] == "stock")
    for ax, metric, title in zip(axes, ("box_ap", "mask_ap", "feature_error"),
                                 ("box AP", "mask AP", "backbone feature error vs stock")):
        for label in [s[0] for s in SETTINGS] + [MEAN_REL_POS]:
            points = sorted(((r["keep_rate"], r[metric]) for r in rows if r["method"] == label), reverse=True)
            style = "--" if label == MEAN_REL_POS else "-"
            ax.plot(*zip(*[(1.0, stock[metric])] + points), style, marker="o", label=label)
        for (label, _), marker in zip(SEC_SETTINGS, "sDv^"):
            value = next(r[metric] for r in rows if r["method"] == label)
            ax.plot([1.0], [value], marker, markersize=8, fillstyle="none", label=label)
        ax.axhline(stock[metric], color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("keep rate (fraction of tokens kept, blocks 1..)")
        ax.set_title(title)
        ax.set_xticks([1.0] + keep_rates)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("COCO AP")
    axes[2].set_ylabel("mean ||f - f_stock|| / ||f_stock||")
    axes[2].legend(fontsize=8)
    fig.suptitle("toy ViTDet, clustering off the shelf (no fine-tuning)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check_inputs(args: argparse.Namespace) -> CfgNode:
    """The config, the validation data and the weights (loaded into the model once), before the
    runs; returns the config."""
    if not os.path.isfile(args.weights):
        raise FileNotFoundError(f"{args.weights!r} not found: train the toy model first with "
                                f"python tools/train_net.py --config {args.config}")
    cfg = load_config(args.config, ["OUTPUT_DIR", args.output_dir, "MODEL.ATC.ENABLED", "False"])
    prepare_datasets(list(cfg.DATASETS.TEST))
    Checkpointer(Trainer.build_model(cfg)).load(args.weights)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default="configs/toy_vitdet.yaml")
    parser.add_argument("--weights", default="output/toy_vitdet/model_final.pth")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.75, 0.5, 0.25, 0.1])
    parser.add_argument("--output-dir", default="output/offshelf_toy", help="evaluator files")
    parser.add_argument("--docs", default="docs", help="where offshelf_toy.{md,json,png} go")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with exit_on_bad_input():
        cfg = check_inputs(args)
    torch.manual_seed(0)
    blocks = list(range(1, cfg.MODEL.VIT.DEPTH))
    stock_features: list[torch.Tensor] = []

    def run(label: str, keep: float, patch: Callable[..., object] | None, kwargs: dict) -> None:
        rows.append({"method": label, "keep_rate": keep,
                     **evaluate(cfg, args.weights, patch, kwargs, stock_features)})
        print(rows[-1], flush=True)

    rows: list[dict] = []
    run("stock", 1.0, None, {})
    # Keep rate 1.0 runs the clustered code path with every token its own cluster.
    run("ATC (any), keep 1.0", 1.0, apply_atc, {"keep_rate": 1.0, "blocks": blocks})
    for label, method, linkage in SETTINGS:
        for keep in args.keep:
            run(label, keep, apply_atc, {"keep_rate": keep, "method": method, "linkage": linkage, "blocks": blocks})
    for keep in args.keep:  # the other relative-position definition for merged tokens
        run(MEAN_REL_POS, keep, apply_atc, {"keep_rate": keep, "blocks": blocks, "rel_pos": "mean"})
    for label, sec in SEC_SETTINGS:
        run(label, 1.0, apply_sec, sec)

    os.makedirs(args.docs, exist_ok=True)
    with open(os.path.join(args.docs, "offshelf_toy.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, args.keep, os.path.join(args.docs, "offshelf_toy.png"))
    with open(os.path.join(args.docs, "offshelf_toy.md"), "w") as f:
        f.write(report(rows, args))
    print(report(rows, args))


def report(rows: list[dict], args: argparse.Namespace) -> str:
    """The Markdown page: command, AP table, and ATC against the best baseline per keep rate."""
    stock = rows[0]
    lines = [
        "# Off-the-shelf token clustering on the toy ViTDet",
        "",
        f"The toy ViTDet Mask R-CNN (`{args.config}`, weights `{args.weights}`) trained once without",
        "clustering, then evaluated on `toy_shapes_val` with clustering in blocks 1.. and no",
        "fine-tuning. Made by (2-core x86_64 CPU):",
        "",
        "```",
        f"OMP_NUM_THREADS=2 python tools/offshelf_toy.py --weights {args.weights}",
        "```",
        "",
        f"Stock: box AP {stock['box_ap']:.1f}, mask AP {stock['mask_ap']:.1f}. Keep rate 1.0 through the "
        f"clustered code path: box AP {rows[1]['box_ap']:.1f}, mask AP {rows[1]['mask_ap']:.1f}.",
        "",
        "Cells: box AP / mask AP (relative error of the backbone features against stock).",
        "",
        "| method | " + " | ".join(f"keep {k:g}" for k in args.keep) + " |",
        "|---|" + "---|" * len(args.keep),
    ]
    for label in [s[0] for s in SETTINGS] + [MEAN_REL_POS]:
        cells = {r["keep_rate"]: r for r in rows if r["method"] == label}
        lines.append(f"| {label} | " + " | ".join(
            f"{cells[k]['box_ap']:.1f} / {cells[k]['mask_ap']:.1f} ({cells[k]['feature_error']:.3f})"
            for k in args.keep) + " |")
    lines += ["", "SEC grouping (every token kept; attention restricted to equal-size groups of "
              "similar keys; all blocks):", "", "| SEC setting | box AP / mask AP (feature error) |",
              "|---|---|"]
    for label, _ in SEC_SETTINGS:
        r = next(r for r in rows if r["method"] == label)
        lines.append(f"| {label} | {r['box_ap']:.1f} / {r['mask_ap']:.1f} ({r['feature_error']:.3f}) |")
    lines += ["", "![AP against keep rate](offshelf_toy.png)", "",
              "Best ATC linkage minus the best baseline: box AP / mask AP / feature error "
              "(negative error difference: ATC closer to the stock features):", ""]
    for keep in args.keep:
        at_keep = [r for r in rows if r["keep_rate"] == keep and r["method"] in [s[0] for s in SETTINGS]]
        atc = [r for r in at_keep if r["method"].startswith("ATC")]
        base = [r for r in at_keep if not r["method"].startswith("ATC")]
        box, mask = (max(r[m] for r in atc) - max(r[m] for r in base) for m in ("box_ap", "mask_ap"))
        error = min(r["feature_error"] for r in atc) - min(r["feature_error"] for r in base)
        lines.append(f"- keep {keep:g}: {box:+.1f} / {mask:+.1f} / {error:+.4f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
