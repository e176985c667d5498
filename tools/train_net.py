#!/usr/bin/env python
"""Train or evaluate ViTDet (Cascade) Mask R-CNN, optionally with ATC / SEC, with Detectron2's
trainer, from a LazyConfig (``.py``, as Detectron2's ``tools/lazyconfig_train_net.py``; overrides
``key=value``) or a yacs config (``.yaml``; overrides ``KEY VALUE``).

    python tools/train_net.py --config-file configs/COCO/atc_mask_rcnn_vitdet_b_100ep.py --num-gpus 8
    python tools/train_net.py --config-file configs/COCO/atc_mask_rcnn_vitdet_b_100ep.py --eval-only \
        train.init_checkpoint=model_final_61ccd1.pkl
    python tools/train_net.py --config configs/toy_vitdet.yaml
    python tools/train_net.py --config configs/atc_vitdet_b.yaml --eval-only MODEL.WEIGHTS model.pkl

Bad input (config, data, weights) stops with one ``error: ...`` line and exit status 2: checked
before any worker starts, and while the model is built and its weights loaded (with several
processes, by each worker).
"""
import os
import sys

from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from torch.multiprocessing import ProcessExitedException

from atc_det.data.datasets import prepare_datasets
from atc_det.engine import Trainer, build_eval_model, check_weights, exit_on_bad_input, load_config, setup
from atc_det.lazy_trainer import check_lazy_inputs, lazy_main, load_lazy_config
from atc_det.modeling import check_config

YACS_SUFFIXES = (".yaml", ".yml")


def print_results(results) -> None:
    """One line per dataset and task with COCO AP and AP50."""
    per_dataset = [("", results)] if "bbox" in results else list(results.items())
    for dataset, tasks in per_dataset:
        for task in ("bbox", "segm"):
            if task in tasks:
                ap, ap50 = tasks[task]["AP"], tasks[task]["AP50"]
                print(f"{dataset} {task} AP: {ap:.2f}  AP50: {ap50:.2f}".strip())


def is_lazy_config(config_file: str) -> bool:
    """True for a LazyConfig (.py), False for a yacs file (.yaml / .yml); a ValueError else."""
    if config_file.endswith(".py"):
        return True
    if config_file.endswith(YACS_SUFFIXES):
        return False
    raise ValueError(f"config file {config_file!r} is neither a LazyConfig (.py) nor a yacs "
                     "config (.yaml): give one of those")


def main(args):
    if is_lazy_config(args.config_file):
        results = lazy_main(args)
    else:
        results = yacs_main(args)
    if comm.is_main_process() and results:
        print_results(results)
    return results


def yacs_main(args):
    cfg = setup(args)
    with exit_on_bad_input():  # e.g. a checkpoint whose keys don't match the model
        if args.eval_only:
            model = build_eval_model(cfg, resume=args.resume)
        else:
            trainer = Trainer(cfg)
            trainer.resume_or_load(resume=args.resume)
    if args.eval_only:
        results = Trainer.test(cfg, model)
    else:
        trainer.train()
        # DefaultTrainer.train() returns results only with TEST.EXPECTED_RESULTS set.
        results = getattr(trainer, "_last_eval_results", None)
    return results


def check_inputs(args) -> None:
    """The config, the data and the weights, once in the launching process (one clear error)."""
    if is_lazy_config(args.config_file):
        check_lazy_inputs(load_lazy_config(args.config_file, args.opts), args.eval_only, args.resume)
        return
    cfg = load_config(args.config_file, args.opts)
    check_config(cfg)
    # --resume loads OUTPUT_DIR's last checkpoint instead of MODEL.WEIGHTS when there is one.
    if not (args.resume and PathManager.exists(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))):
        check_weights(cfg.MODEL.WEIGHTS)
    prepare_datasets(list(cfg.DATASETS.TEST) + ([] if args.eval_only else list(cfg.DATASETS.TRAIN)))


def parse_args(argv=None):
    parser = default_argument_parser()
    parser.add_argument("--config", dest="config_file", metavar="FILE", help="same as --config-file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    with exit_on_bad_input():
        check_inputs(args)
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except ProcessExitedException as error:
        if error.exit_code != 2:
            raise
        sys.exit(2)  # a worker stopped on bad input and printed its error line
