#!/usr/bin/env python
r"""Pictures of the tokens that ATC merged in every reduced block of a ViTDet model.

    python tools/visualize_merged_tokens.py --config configs/toy_vitdet.yaml \
        --input photo.jpg --output out/ MODEL.WEIGHTS output/toy_vitdet/model_final.pth \
        MODEL.ATC.BLOCKS "[1, 2, 3]"
    python tools/visualize_merged_tokens.py --config configs/toy_vitdet.yaml \
        --dataset toy_shapes_val --num-samples 4 --output out/ MODEL.ATC.BLOCKS "[1, 2, 3]"

ATC is always on (``MODEL.ATC.ENABLED True``); the other ``MODEL.ATC.*`` keys, ``MODEL.WEIGHTS``
and any other key can be set as trailing ``KEY VALUE`` pairs. Images are resized as Detectron2's
DefaultPredictor does (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``). For every image NAME it
writes under ``--output``/NAME/:

- ``block{b}.png``: the input with every cluster of block b painted in its mean colour, borders;
- ``predictions.png``: the model's instances (score >= --score-threshold), Detectron2 Visualizer;
- ``blocks.png``: input | every reduced block | predictions, side by side;
- ``compare.png``: one row per (--methods x --keep-rates) with every block and the predictions.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from detectron2.config import CfgNode, get_cfg
from detectron2.utils.env import seed_all_rng

from atc_det import visualize
from atc_det.config import add_atc_det_config
from atc_det.engine import build_eval_model, check_weights, exit_on_bad_input, load_config
from atc_det.registry import method_names

KEY_LIKE = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)+")  # e.g. MODEL.ATC.KEEP_RATE


def first_config_key(argv: list[str]) -> int:
    """Index of the first config key in ``argv``: a full key (e.g. ``MODEL.ATC.KEEP_RATE``,
    ``SEED``), or a dotted upper-case name under a top-level node that is not a file (a misspelt
    key such as ``MODEL.ATC.KEEP_RATIO``, which ``load_config`` then names); ``len(argv)`` if none."""
    defaults = get_cfg()
    add_atc_det_config(defaults)
    missing = object()
    for index, token in enumerate(argv):
        node = defaults
        for part in token.split("."):
            node = node.get(part, missing) if isinstance(node, CfgNode) else missing
        if node is not missing and not isinstance(node, CfgNode):
            return index
        if (KEY_LIKE.fullmatch(token) and isinstance(defaults.get(token.split(".")[0]), CfgNode)
                and not os.path.exists(token)):
            return index
    return len(argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options, then ``KEY VALUE`` overrides: the first config key and all after it go to
    ``args.opts``, so they may directly follow --keep-rates / --methods (several values each)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first_key = first_config_key(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="KEY VALUE config overrides go last; the first config key starts them.",
    )
    parser.add_argument("--config", "--config-file", dest="config_file", required=True, metavar="FILE")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="an image file or a folder of images")
    source.add_argument("--dataset", help="a registered dataset name, e.g. toy_shapes_val")
    parser.add_argument("--num-samples", type=int, default=4, help="images taken from --dataset")
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    parser.add_argument("--keep-rates", type=float, nargs="*", default=[0.75, 0.5, 0.25])
    parser.add_argument("--methods", nargs="*", default=["atc", "tome"], choices=method_names())
    parser.add_argument("--tile-size", type=int, default=256, help="long side of a sheet's tiles")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    args = parser.parse_args(argv[:first_key])
    args.opts = argv[first_key:]
    return args


def image_sources(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(output name, file) of every image to draw; names are made unique."""
    if args.dataset:
        from detectron2.data import DatasetCatalog

        from atc_det.data.datasets import prepare_datasets

        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        prepare_datasets([args.dataset])
        files = [Path(d["file_name"]) for d in DatasetCatalog.get(args.dataset)[: args.num_samples]]
    else:
        files = visualize.list_images(args.input)
    sources, used = [], set()
    for file in files:
        name, index = file.stem, 1
        while name in used:
            name, index = f"{file.stem}_{index}", index + 1
        used.add(name)
        sources.append((name, str(file)))
    return sources


def thing_metadata(name: str):
    """Detectron2 metadata with the class names of dataset ``name`` when its files are on disk
    (nothing is generated or downloaded for them; without them, class ids are drawn)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from atc_det.data.datasets import register_toy_shapes

    register_toy_shapes()
    metadata = MetadataCatalog.get(name)
    if not metadata.get("thing_classes") and name in DatasetCatalog.list():
        try:
            DatasetCatalog.get(name)  # the COCO loader fills thing_classes
        except (FileNotFoundError, OSError):
            pass
    return metadata


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.tile_size < 16:
        raise ValueError(f"--tile-size must be >= 16 pixels, got {args.tile_size}")
    cfg = load_config(args.config_file, list(args.opts) + ["MODEL.ATC.ENABLED", "True"])
    check_weights(cfg.MODEL.WEIGHTS)
    sources = image_sources(args)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)  # the same random weights on every run
    model = build_eval_model(cfg).eval()
    if not cfg.MODEL.WEIGHTS:
        print("warning: MODEL.WEIGHTS is empty: the model has random weights", file=sys.stderr)
    metadata = thing_metadata(args.dataset or cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
    for name, file in tqdm(sources, desc="images", unit="image", disable=len(sources) < 2):
        image = visualize.resize_for_model(visualize.read_rgb(file), cfg)
        pictures = visualize.merged_token_pictures(
            model, cfg, image, args.keep_rates, args.methods, args.tile_size, args.score_threshold,
            metadata,
        )
        folder = Path(args.output) / name
        folder.mkdir(parents=True, exist_ok=True)
        for key, picture in pictures.items():
            Image.fromarray(np.ascontiguousarray(picture)).save(folder / f"{key}.png")
    print(f"wrote {len(sources)} image folder(s) under {args.output}")


if __name__ == "__main__":
    with exit_on_bad_input():
        main()
