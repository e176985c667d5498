#!/usr/bin/env python
"""Off-the-shelf token reduction sweep for any ViTDet config (yacs .yaml or LazyConfig .py): the
stock model and every (method, keep rate) cell, each evaluated with the config's evaluator and
timed, without fine-tuning (library: atc_det/offshelf.py; guide: docs/offshelf.md).

    python tools/offshelf.py --config-file CFG --weights W --keep 0.75 0.5 \\
        --methods atc:average tome random --output DIR [config overrides]
    python tools/offshelf.py --config-file configs/toy_vitdet.yaml \\
        --weights output/toy_vitdet/model_final.pth --output output/offshelf_toy
    python tools/offshelf.py --config-file configs/COCO/atc_mask_rcnn_vitdet_b_100ep.py --num-gpus 8 \\
        --weights detectron2://ViTDet/COCO/mask_rcnn_vitdet_b/f325346929/model_final_61ccd1.pkl \\
        --keep 0.75 0.5 0.25 --methods atc:average tome random --output output/offshelf_b

Methods: atc:average, atc:complete, atc:single (atc: the config's linkage), tome, kmedoids,
dpcknn, random (and any registered clustering method), sec / sec:G (SEC attention, G groups in
global blocks; one cell: it keeps every token). Overrides come last (KEY VALUE for .yaml,
key=value for .py). Writes DIR/results.jsonl (a row per cell as it finishes; a rerun with the
same arguments skips finished cells), DIR/results.md and DIR/ap_vs_ms.png, DIR/ap_vs_keep.png.
Bad input stops with one ``error: ...`` line and exit status 2.
"""
import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, ROOT)  # benchmarks/ (the GFLOP count); tools/ stays first (train_net)

from atc_det import offshelf  # noqa: E402  (torch only: Detectron2 is imported after the first checks)


def parse_args(argv=None) -> argparse.Namespace:
    """The sweep's arguments, with Detectron2's launch flags (as its default_argument_parser)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", "--config", dest="config_file", default="", metavar="FILE")
    parser.add_argument("--weights", default="", help="checkpoint (.pth, .pkl, detectron2:// URL)")
    parser.add_argument("--keep", nargs="+", default=["0.75", "0.5", "0.25", "0.1"],
                        help="keep rates in (0, 1]")
    parser.add_argument("--methods", nargs="+", default=list(offshelf.DEFAULT_METHODS))
    parser.add_argument("--output", default="", help="results folder (rerun: resumes)")
    parser.add_argument("--blocks", type=int, nargs="+", help="reduction blocks (default: the config's)")
    parser.add_argument("--cluster-blocks", type=int, nargs="+",
                        help="label reuse: only these blocks cluster (default: the config's)")
    parser.add_argument("--rel-pos", help="'centroid' or 'mean' (default: the config's)")
    parser.add_argument("--feature-images", type=int, default=16,
                        help="feature error over the first N test images")
    parser.add_argument("--warmup", type=int, default=5, help="forwards per process not timed")
    parser.add_argument("--compare", nargs="+", metavar="DIR",
                        help="only print the AP of each cell of these results folders side by side")
    parser.add_argument("--num-gpus", type=int, default=1, help="number of GPUs per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    port = 2**15 + 2**14 + hash(os.getuid() if sys.platform != "win32" else 1) % 2**14
    parser.add_argument("--dist-url", default=f"tcp://127.0.0.1:{port}")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=None,
                        help="config overrides: KEY VALUE (.yaml) or key=value (.py)")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> offshelf.SweepSpec:
    """Every check before launch (one error), and the cells still to run."""
    from train_net import check_inputs, is_lazy_config  # tools/train_net.py's checks

    from atc_det.engine import check_weights

    check_weights(args.weights, key="--weights")
    lazy = is_lazy_config(args.config_file)
    opts = offshelf.route_opts(lazy, args.opts or [], args.weights, args.output)
    check_inputs(argparse.Namespace(config_file=args.config_file, opts=opts, eval_only=True, resume=False))
    cfg = offshelf.load_sweep_config(lazy, args.config_file, opts)
    offshelf.check_evaluator(cfg, lazy)
    base = offshelf.config_atc_arguments(cfg, lazy)
    options = dict(blocks=args.blocks, cluster_blocks=args.cluster_blocks, rel_pos=args.rel_pos)
    methods = [m for m in dict.fromkeys(args.methods) if not m.startswith("sec")]
    atc_arguments = {m: offshelf.cell_arguments(m, base, options) for m in methods}
    offshelf.check_cell_arguments(offshelf.config_depth(cfg, lazy), atc_arguments, args.keep)
    settings = offshelf.sweep_settings(args)
    os.makedirs(args.output, exist_ok=True)
    rows = offshelf.read_rows(os.path.join(args.output, offshelf.RESULTS))  # settings checked before
    done = {(r["method"], float(r["keep_rate"])) for r in rows}
    cells = offshelf.plan_cells(args.methods, args.keep)
    return offshelf.SweepSpec(
        lazy=lazy, config_file=args.config_file, opts=opts, output=args.output,
        cells=[c for c in cells if c.key not in done], total=len(cells), atc_arguments=atc_arguments,
        settings=settings, feature_images=args.feature_images, warmup=args.warmup,
        command=shlex.join(["python", "tools/offshelf.py", *sys.argv[1:]]))


def main() -> None:
    args = parse_args()
    if args.compare:
        runs = {folder: offshelf.read_rows(os.path.join(folder, offshelf.RESULTS)) for folder in args.compare}
        missing = [folder for folder, rows in runs.items() if not rows]
        if missing:
            print(f"error: no {offshelf.RESULTS} rows in {missing[0]}", file=sys.stderr)
            sys.exit(2)
        print(offshelf.compare_markdown(runs), end="")
        return
    try:
        offshelf.check_arguments(args)  # before Detectron2 is imported: quick errors
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    from detectron2.engine import launch
    from torch.multiprocessing import ProcessExitedException

    from atc_det.engine import exit_on_bad_input

    with exit_on_bad_input():
        spec = prepare(args)
    if not spec.cells:
        offshelf.write_report(offshelf.read_rows(os.path.join(spec.output, offshelf.RESULTS)), spec.output)
        print(f"offshelf: all {spec.total} cells are in {spec.output}/{offshelf.RESULTS}; report rewritten")
        return
    try:
        launch(offshelf.sweep_worker, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(spec,))
    except ProcessExitedException as error:
        if error.exit_code != 2:
            raise
        sys.exit(2)  # a worker stopped on bad input and printed its error line


if __name__ == "__main__":
    main()
