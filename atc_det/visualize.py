"""Merged-token maps: which image regions ATC (or a baseline) merged in each reduced ViT block.

Two halves:

- pictures (pure NumPy / PIL): :func:`pixel_cluster_map` turns a patch-grid source map into one
  cluster id per output pixel, :func:`paint_clusters` paints every cluster with its members' mean
  colour, :func:`draw_cluster_borders` draws the borders between clusters, :func:`make_sheet`
  lays tiles out in a captioned grid;
- the model: :func:`source_maps_for_image` gives {block: [Hp, Wp] cluster ids} for a Detectron2
  ViTDet model with ATC and one RGB image, :func:`set_atc` re-configures the model's reduced
  blocks (another keep rate or method), :func:`predict_instances` / :func:`draw_predictions` run
  the detector and draw its instances with Detectron2's ``Visualizer``.

Images are RGB uint8 arrays [H, W, 3] throughout; the model's own input format is handled inside.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from torch import Tensor

from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.modeling import ViT
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer

from atc_det.modeling.atc_vit import ATCBlock, apply_atc_from_cfg, collect_source_maps

__all__ = [
    "IMAGE_EXTENSIONS",
    "draw_cluster_borders",
    "draw_predictions",
    "fit_size",
    "list_images",
    "make_sheet",
    "merged_token_pictures",
    "paint_clusters",
    "pixel_cluster_map",
    "predict_instances",
    "read_rgb",
    "render_merged_tokens",
    "resize_for_model",
    "resize_rgb",
    "set_atc",
    "source_maps_for_image",
    "vit_of",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CAPTION_HEIGHT = 18  # pixels of caption strip above every tile of a sheet
SHEET_PAD = 4  # pixels between tiles and around the sheet


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def fit_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(height, width) scaled so that the longer side is ``long_side`` (aspect ratio kept)."""
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def pixel_cluster_map(
    patch_map: Tensor, patch_size: int, image_hw: tuple[int, int], out_hw: tuple[int, int] | None = None
) -> Tensor:
    """Cluster id of every pixel of an image drawn at ``out_hw``: [h, w] patches -> [oh, ow].

    ``patch_map`` [h, w] is the patch grid of the model input of ``image_hw`` = (H, W) pixels,
    patch (r, c) covering pixels [r * p, (r + 1) * p) x [c * p, (c + 1) * p); patches beyond the
    image (padding) are cropped, and pixels beyond the grid (an input not padded to a multiple
    of p: the patch embedding drops them) take the last patch. Output pixel (y, x) shows input
    pixel (floor((y + 0.5) * H / oh), floor((x + 0.5) * W / ow)).
    """
    height, width = image_hw
    out_h, out_w = out_hw or image_hw
    if patch_map.dim() != 2:
        raise ValueError(f"patch_map must be [h, w], got shape {tuple(patch_map.shape)}")
    rows = ((2 * torch.arange(out_h) + 1) * height // (2 * out_h) // patch_size).clamp(max=patch_map.shape[0] - 1)
    cols = ((2 * torch.arange(out_w) + 1) * width // (2 * out_w) // patch_size).clamp(max=patch_map.shape[1] - 1)
    patch_map = patch_map.cpu()
    return patch_map[rows[:, None], cols[None, :]]


def paint_clusters(image: np.ndarray, pixel_map: Tensor | np.ndarray) -> np.ndarray:
    """Every cluster painted with the mean colour of its pixels: [H, W, 3] uint8 -> same."""
    pixel_map = np.asarray(pixel_map)
    if image.shape[:2] != pixel_map.shape:
        raise ValueError(f"image {image.shape[:2]} and pixel_map {pixel_map.shape} sizes differ")
    _, cluster = np.unique(pixel_map, return_inverse=True)
    cluster = cluster.reshape(-1)
    counts = np.bincount(cluster)
    colors = image.reshape(-1, 3).astype(np.float64)
    means = np.stack([np.bincount(cluster, colors[:, c]) / counts for c in range(3)], axis=1)
    return np.rint(means[cluster]).astype(np.uint8).reshape(image.shape)


def draw_cluster_borders(
    image: np.ndarray, pixel_map: Tensor | np.ndarray, color: tuple[int, int, int] | None = None
) -> np.ndarray:
    """``image`` [H, W, 3] with a border on every pixel whose right or lower neighbour is in
    another cluster of ``pixel_map`` [H, W] (one-pixel lines). ``color`` None: black on light
    pixels, white on dark ones (luma < 128), so borders show on any colour."""
    pixel_map = np.asarray(pixel_map)
    if image.shape[:2] != pixel_map.shape:
        raise ValueError(f"image {image.shape[:2]} and pixel_map {pixel_map.shape} sizes differ")
    border = np.zeros(pixel_map.shape, dtype=bool)
    border[:, :-1] |= pixel_map[:, 1:] != pixel_map[:, :-1]
    border[:-1, :] |= pixel_map[1:, :] != pixel_map[:-1, :]
    out = image.copy()
    if color is None:
        luma = image[border].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        out[border] = np.where(luma[:, None] < 128, 255, 0).astype(np.uint8)
    else:
        out[border] = color
    return out


def resize_rgb(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an RGB uint8 image to ``out_hw`` (a copy when the size is the same)."""
    if image.shape[:2] == tuple(out_hw):
        return image.copy()
    return np.asarray(Image.fromarray(image).resize((out_hw[1], out_hw[0]), Image.BILINEAR))


def render_merged_tokens(
    image: np.ndarray, patch_map: Tensor, patch_size: int, out_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """The picture of one block: ``image`` [H, W, 3] (the model input) drawn at ``out_hw`` with
    every cluster of ``patch_map`` [h, w] painted in its mean colour and cluster borders drawn."""
    out_hw = out_hw or image.shape[:2]
    pixel_map = pixel_cluster_map(patch_map, patch_size, image.shape[:2], out_hw)
    return draw_cluster_borders(paint_clusters(resize_rgb(image, out_hw), pixel_map), pixel_map)


def make_sheet(
    tiles: Sequence[Sequence[np.ndarray]], captions: Sequence[Sequence[str]]
) -> np.ndarray:
    """A white grid of equal-size RGB tiles, each under a one-line caption.

    ``tiles[r][c]`` [h, w, 3] goes to rows ``SHEET_PAD + r * (CAPTION_HEIGHT + h + SHEET_PAD) +
    CAPTION_HEIGHT`` and columns ``SHEET_PAD + c * (w + SHEET_PAD)``, its caption (clipped to the
    tile width) just above; rows may be shorter than the longest (left-aligned). Returns
    [H, W, 3] uint8.
    """
    if not tiles or not all(tiles) or len(captions) != len(tiles):
        raise ValueError("make_sheet needs a non-empty row of tiles and one caption row per row")
    shapes = {tile.shape for row in tiles for tile in row}
    if len(shapes) != 1:
        raise ValueError(f"all tiles of a sheet must have one shape, got {sorted(shapes)}")
    tile_h, tile_w, _ = shapes.pop()
    num_cols = max(len(row) for row in tiles)
    sheet = Image.new(
        "RGB",
        (SHEET_PAD + num_cols * (tile_w + SHEET_PAD),
         SHEET_PAD + len(tiles) * (CAPTION_HEIGHT + tile_h + SHEET_PAD)),
        (255, 255, 255),
    )
    font = ImageFont.load_default(size=12)
    for r, (row, row_captions) in enumerate(zip(tiles, captions)):
        if len(row_captions) != len(row):
            raise ValueError(f"row {r} has {len(row)} tiles but {len(row_captions)} captions")
        top = SHEET_PAD + r * (CAPTION_HEIGHT + tile_h + SHEET_PAD)
        for c, (tile, caption) in enumerate(zip(row, row_captions)):
            left = SHEET_PAD + c * (tile_w + SHEET_PAD)
            strip = Image.new("RGB", (tile_w, CAPTION_HEIGHT), (255, 255, 255))
            ImageDraw.Draw(strip).text((1, 2), caption, fill=(0, 0, 0), font=font)  # clipped
            sheet.paste(strip, (left, top))
            sheet.paste(Image.fromarray(tile), (left, top + CAPTION_HEIGHT))
    return np.asarray(sheet)


# ---------------------------------------------------------------------------------------------
# Images on disk
# ---------------------------------------------------------------------------------------------


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3] (EXIF orientation applied, as Detectron2 reads)."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image {str(path)!r} not found") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {str(path)!r} ({error}); fix or remove the file") from None


def list_images(path: str | os.PathLike) -> list[Path]:
    """``path`` itself if it is a file, else the image files (by extension) in the folder, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input {str(path)!r} is neither an image file nor a folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(
            f"folder {str(path)!r} holds no image files (extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    return images


def resize_for_model(image: np.ndarray, cfg: CfgNode) -> np.ndarray:
    """The test-time resize of Detectron2's ``DefaultPredictor`` (shortest edge to
    ``INPUT.MIN_SIZE_TEST``, longest at most ``INPUT.MAX_SIZE_TEST``) of an RGB image."""
    size = cfg.INPUT.MIN_SIZE_TEST
    resize = T.ResizeShortestEdge([size, size], cfg.INPUT.MAX_SIZE_TEST)
    return resize.get_transform(image).apply_image(image)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def vit_of(model: torch.nn.Module) -> ViT:
    """The Detectron2 ``ViT`` of a ViTDet model (``model.backbone.net``)."""
    vit = getattr(getattr(model, "backbone", None), "net", None)
    if not isinstance(vit, ViT):
        raise TypeError(
            f"expected a ViTDet model whose backbone.net is a detectron2 ViT, got "
            f"{type(model).__name__} (MODEL.BACKBONE.NAME must be build_vitdet_backbone)"
        )
    return vit


def _model_input(model: torch.nn.Module, image: np.ndarray) -> dict:
    """One Detectron2 input dict for an RGB uint8 image [H, W, 3] at the model's input size."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    if getattr(model, "input_format", "RGB") == "BGR":
        image = image[:, :, ::-1]
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32)
    return {"image": tensor, "height": image.shape[0], "width": image.shape[1]}


def source_maps_for_image(model: torch.nn.Module, image: np.ndarray, seed: int = 0) -> dict[int, Tensor]:
    """Cluster of every patch in each reduced block: {block index: LongTensor [Hp, Wp]} (CPU).

    ``model`` is a ViTDet model with ATC (``MODEL.ATC.ENABLED``), ``image`` RGB uint8 [H, W, 3]
    at the model's input size (see :func:`resize_for_model`). It is normalised and padded as
    ``model.preprocess_image`` does; patch (r, c) covers input pixels [r * p, (r + 1) * p) x
    [c * p, (c + 1) * p), positions beyond H, W are padding. Ids are unique within the image
    (window index * K + label). Random draws (method "random") use ``seed``, the same as
    :func:`predict_instances`, so both see the same clusters.
    """
    vit = vit_of(model)
    if not any(isinstance(getattr(block, "_checkpoint_wrapped_module", block), ATCBlock) for block in vit.blocks):
        raise ValueError("the model has no reduced blocks: build it with MODEL.ATC.ENABLED True")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images = model.preprocess_image([_model_input(model, image)])
        maps = collect_source_maps(vit, images.tensor)
    return {block: ids[0].cpu() for block, ids in maps.items()}


def predict_instances(
    model: torch.nn.Module, image: np.ndarray, score_threshold: float = 0.5, seed: int = 0
) -> Instances:
    """The detector's instances (CPU) on an RGB uint8 image at the model's input size, those with
    score >= ``score_threshold``."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        instances = model([_model_input(model, image)])[0]["instances"].to("cpu")
    return instances[instances.scores >= score_threshold]


def draw_predictions(image: np.ndarray, instances: Instances, metadata=None) -> np.ndarray:
    """Instances drawn on an RGB image with Detectron2's ``Visualizer`` (fixed colours: the
    Visualizer's random colours come from NumPy's global generator, seeded here and restored)."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        visualizer = Visualizer(image, metadata)
        return visualizer.draw_instance_predictions(instances).get_image()
    finally:
        np.random.set_state(state)


def set_atc(
    model: torch.nn.Module, cfg: CfgNode, keep_rate: float | None = None, method: str | None = None
) -> torch.nn.Module:
    """Re-configure the reduced blocks of ``model`` (in place) with ``cfg``'s ``MODEL.ATC.*``,
    optionally with one ``keep_rate`` for all of them and another ``method`` (keep-rate mode,
    no threshold). Clustering adds no parameters, so the weights are untouched."""
    cfg = cfg.clone()
    cfg.defrost()
    if keep_rate is not None:
        cfg.MODEL.ATC.KEEP_RATE = [float(keep_rate)]
    if method is not None:
        cfg.MODEL.ATC.METHOD = method
    if keep_rate is not None or method is not None:
        cfg.MODEL.ATC.THRESHOLD = -1.0
    apply_atc_from_cfg(vit_of(model), cfg)
    return model


def _block_tiles(
    model: torch.nn.Module, image: np.ndarray, tile_hw: tuple[int, int], score_threshold: float,
    metadata,
) -> tuple[dict[int, Tensor], np.ndarray, list[np.ndarray], list[str]]:
    """Source maps, the full-size predictions picture, and one tile + caption per reduced block
    and for the predictions, with the model as it is configured now."""
    patch_size = vit_of(model).patch_embed.proj.kernel_size[0]
    maps = source_maps_for_image(model, image)
    predictions = draw_predictions(image, predict_instances(model, image, score_threshold), metadata)
    tiles = [render_merged_tokens(image, ids, patch_size, tile_hw) for ids in maps.values()]
    captions = [f"block {b}: {ids.unique().numel()} of {ids.numel()}" for b, ids in maps.items()]
    return maps, predictions, tiles + [resize_rgb(predictions, tile_hw)], captions + ["predictions"]


def merged_token_pictures(
    model: torch.nn.Module,
    cfg: CfgNode,
    image: np.ndarray,
    keep_rates: Sequence[float] = (),
    methods: Sequence[str] = (),
    tile_size: int = 256,
    score_threshold: float = 0.5,
    metadata=None,
) -> dict[str, np.ndarray]:
    """Every picture of one RGB uint8 image [H, W, 3] at the model's input size.

    With ``cfg``'s own ``MODEL.ATC.*`` settings: ``"block{b}"`` for every reduced block b (H x W),
    ``"predictions"`` (H x W) and the sheet ``"blocks"`` (input, every block, predictions; tiles
    with the long side ``tile_size``). With ``keep_rates`` and ``methods``: the sheet ``"compare"``,
    one row per (method, keep rate) with every block and the predictions. ``model`` is a ViTDet
    with ATC built from ``cfg``; it is left configured as ``cfg`` says.
    """
    patch_size = vit_of(model).patch_embed.proj.kernel_size[0]
    tile_hw = fit_size(image.shape[0], image.shape[1], tile_size)
    set_atc(model, cfg)
    maps, predictions, tiles, captions = _block_tiles(model, image, tile_hw, score_threshold, metadata)
    pictures = {f"block{b}": render_merged_tokens(image, ids, patch_size) for b, ids in maps.items()}
    pictures["predictions"] = predictions
    pictures["blocks"] = make_sheet([[resize_rgb(image, tile_hw)] + tiles], [["input"] + captions])
    rows, row_captions = [], []
    try:
        for method in methods:
            for keep_rate in keep_rates:
                set_atc(model, cfg, keep_rate, method)
                _, _, tiles, captions = _block_tiles(model, image, tile_hw, score_threshold, metadata)
                rows.append(tiles)
                row_captions.append([f"{method} {keep_rate:g} | {c}" for c in captions])
    finally:
        set_atc(model, cfg)
    if rows:
        pictures["compare"] = make_sheet(rows, row_captions)
    return pictures
