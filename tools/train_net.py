#!/usr/bin/env python
"""Train or evaluate ViTDet Mask R-CNN (optionally with ATC / SEC) with Detectron2's trainer.

    python tools/train_net.py --config configs/toy_vitdet.yaml
    python tools/train_net.py --config configs/atc_vitdet_b.yaml --num-gpus 8
    python tools/train_net.py --config configs/atc_vitdet_b.yaml --eval-only MODEL.WEIGHTS model.pkl
"""
import sys

from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm

from atc_det.data.datasets import prepare_datasets
from atc_det.engine import Checkpointer, Trainer, load_config, setup


def print_results(results) -> None:
    """One line per dataset and task with COCO AP and AP50."""
    per_dataset = [("", results)] if "bbox" in results else list(results.items())
    for dataset, tasks in per_dataset:
        for task in ("bbox", "segm"):
            if task in tasks:
                ap, ap50 = tasks[task]["AP"], tasks[task]["AP50"]
                print(f"{dataset} {task} AP: {ap:.2f}  AP50: {ap50:.2f}".strip())


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Checkpointer(
            model, save_dir=cfg.OUTPUT_DIR, strict=cfg.MODEL.WEIGHTS_STRICT
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        # DefaultTrainer.train() returns results only with TEST.EXPECTED_RESULTS set.
        results = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process() and results:
        print_results(results)
    return results


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--config", dest="config_file", metavar="FILE", help="same as --config-file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    try:
        # Check the config and the data once, before any worker starts (one clear error).
        cfg = load_config(args.config_file, args.opts)
        prepare_datasets(list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN)))
    except (KeyError, FileNotFoundError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        sys.exit(2)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
