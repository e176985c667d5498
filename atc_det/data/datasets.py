"""Dataset registration (Detectron2's COCO loader) and clear errors for missing data."""
import logging
import os
from typing import Iterable

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .toy_shapes import SPLITS, generate_toy_shapes, toy_shapes_ready

logger = logging.getLogger(__name__)

TOY_PREFIX = "toy_shapes_"


def datasets_root() -> str:
    """Detectron2's dataset root: ``$DETECTRON2_DATASETS``, default ``./datasets``."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def toy_shapes_root() -> str:
    return os.path.join(datasets_root(), "toy_shapes")


def register_toy_shapes(root: str | None = None) -> None:
    """Register ``toy_shapes_{train,val}`` with Detectron2's COCO loader (idempotent)."""
    root = root or toy_shapes_root()
    for split in SPLITS:
        name = TOY_PREFIX + split
        if name in DatasetCatalog.list():
            continue
        register_coco_instances(
            name, {}, os.path.join(root, "annotations", f"{split}.json"), os.path.join(root, split)
        )


def prepare_datasets(names: Iterable[str]) -> None:
    """Make sure every dataset in ``names`` can be loaded; generate the toy dataset if missing.

    Raises:
        KeyError: a name that is not registered.
        FileNotFoundError: a registered dataset (e.g. real COCO) whose files are not on disk.
    """
    register_toy_shapes()
    for name in names:
        if name not in DatasetCatalog.list():
            raise KeyError(
                f"dataset {name!r} is not registered. Registered COCO-style names include "
                f"coco_2017_train, coco_2017_val, {TOY_PREFIX}train, {TOY_PREFIX}val."
            )
        meta = MetadataCatalog.get(name)
        if name.startswith(TOY_PREFIX):
            root = os.path.dirname(os.path.dirname(meta.json_file))
            if not toy_shapes_ready(root):
                logger.info("Generating the toy shapes dataset in %s", root)
                generate_toy_shapes(root)
            continue
        json_file = getattr(meta, "json_file", None)
        image_root = getattr(meta, "image_root", None)
        missing = [p for p in (json_file, image_root) if p and not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(
                f"dataset {name!r} is missing on disk: {', '.join(missing)} not found. "
                f"Put it under {os.path.abspath(datasets_root())} in Detectron2's layout "
                "(e.g. coco/annotations/instances_val2017.json and coco/val2017/) or set "
                "DETECTRON2_DATASETS to the folder that holds coco/; see datasets/README.md."
            )
