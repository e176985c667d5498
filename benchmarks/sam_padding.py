"""What ATC does with the padding of Segment Anything's inputs, and what the padding-aware
options do instead: ``real_area=True`` and threshold mode (SAM-B's image encoder, random weights).

    OMP_NUM_THREADS=2 flock /tmp/cpu.lock .venv/bin/python benchmarks/sam_padding.py \
        --json docs/sam_padding.json --png docs/sam_padding.png          # docs/sam.md, padding

SAM resizes a photo's longer side to 1024 (``ResizeLongestSide``, as ``SamPredictor.set_image``)
and zero-pads the normalised image at the bottom / right to 1024x1024 (``Sam.preprocess``): a
4:3 photo leaves a quarter of the 64x64 patch grid as padding, all of it the same pixels. The
encoder's windowed blocks pad the grid to 70x70 (5x5 windows of 14); that window padding is the
library's "invalid" padding and is not counted here: "padding" below is SAM's zero padding,
"real" the patches that hold part of the photo.

Policies, each on the same input, clusters counted in each reduced block's cluster map
(``atc_det.vitdet_block.collect_source_maps``: blocks 1-11):

- ``keep k``: the library's fixed keep rate (``apply_atc(encoder, keep_rate=k)``): every window
  keeps k of its tokens, padding or not.
- ``real-area keep r``: ``apply_atc(encoder, keep_rate=r, real_area=True)``: each window keeps
  ``int(r * its real tokens)`` clusters of its real tokens plus one cluster of its padding tokens
  (and one of its window padding). ``r = k`` (the real area at the resolution a square photo
  gets), and ``r`` that spends the same total clusters as ``keep k``.
- ``threshold t``: the library's threshold mode (``apply_atc(encoder, threshold=t)``: merge while
  the linkage distance is <= t): ``t`` tiny (only tokens with equal keys merge), and ``t`` found
  by bisection to spend about the same total clusters as ``keep k``.

Per policy, means over the reduced blocks 1-11: the clusters computed per block (the partition's
cluster counts summed over the windows, window padding clusters included: what attention and the
MLP run on; equal budgets are matched on this), and in the cluster map those wholly in SAM's
padding, wholly in the real area and spanning both (the rest hold window padding only); real
patches per cluster that holds real patches; the error of the encoder's output
(``image_embeddings`` [256, 64, 64], the features ``SamPredictor`` keeps) on the real area against
the unreduced encoder on the same input: relative Frobenius error and mean cosine similarity per
location. Random weights: this is how far the reduction moves the features the mask decoder
would read, not a mask-quality number.

Position embeddings: SAM's initialisation sets the absolute position embedding and the relative-
position tables to zero, so all padding tokens of a window are equal (threshold mode merges them
at distance 0). A trained SAM's are not (its learned ``pos_embed`` started from MAE's fixed 2D
sin-cos table), so ``--positions sincos`` (default: both) also runs every policy with MAE's 2D
sin-cos table as ``pos_embed`` (relative-position tables still zero).
Bad arguments: one ``error: ...`` line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_sam import ArgumentParser  # noqa: E402  (one error line, exit 2)

PATCH, WINDOW = 16, 14
POSITIONS = ("zero", "sincos")


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2D sin-cos position embedding of a ``grid`` x ``grid`` patch grid, laid out as
    SAM's ``pos_embed`` [1, grid, grid, dim]: half the channels encode the row, half the column."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    angles = torch.arange(grid, dtype=torch.float64)[:, None] * omega
    axis = torch.cat([angles.sin(), angles.cos()], 1)  # [grid, dim / 2]
    rows = axis[:, None].expand(grid, grid, dim // 2)
    cols = axis[None].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], -1)[None].float()


def sam_input(photo: np.ndarray, sam) -> tuple[torch.Tensor, tuple[int, int]]:
    """The encoder input of ``photo`` [H, W, 3] uint8 as ``SamPredictor.set_image`` makes it
    (``ResizeLongestSide`` then ``Sam.preprocess``: normalise, zero-pad bottom / right), and the
    resized photo's (height, width)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(photo)
    tensor = torch.as_tensor(resized).permute(2, 0, 1)[None].float()
    return sam.preprocess(tensor), resized.shape[:2]


def real_patches(input_hw: tuple[int, int], grid: int) -> torch.Tensor:
    """[grid, grid] bool: the patches that hold part of the photo (the rest is SAM's padding)."""
    real = torch.zeros(grid, grid, dtype=torch.bool)
    real[: math.ceil(input_hw[0] / PATCH), : math.ceil(input_hw[1] / PATCH)] = True
    return real


def window_counts(real: torch.Tensor) -> list[dict]:
    """Per 14x14 window of the grid padded to a multiple of 14 (row-major): its real patches, SAM
    padding patches and window padding (beyond the grid)."""
    grid = real.shape[0]
    windows = math.ceil(grid / WINDOW)
    out = []
    for r in range(windows):
        for c in range(windows):
            block = real[r * WINDOW:(r + 1) * WINDOW, c * WINDOW:(c + 1) * WINDOW]
            out.append(dict(window=(r, c), real=int(block.sum()), padding=int((~block).sum()),
                            window_padding=WINDOW * WINDOW - block.numel()))
    return out


@contextlib.contextmanager
def counted_slots():
    """While active, the clusters each clustering call makes (its partition's cluster counts
    summed over the windows, window padding clusters included: what attention and MLP run on)
    are appended to the yielded list, one entry per reduced block."""
    from atc_det import vitdet_block

    inner, slots = vitdet_block.cluster_grid, []

    def counting(*args, **kwargs):
        part = inner(*args, **kwargs)
        slots.append(sum(part.cluster_counts))
        return part

    vitdet_block.cluster_grid = counting
    try:
        yield slots
    finally:
        vitdet_block.cluster_grid = inner


def cluster_counts(maps: dict[int, torch.Tensor], real: torch.Tensor) -> dict:
    """Clusters per reduced block (mean over the blocks) wholly in the padding, wholly in the real
    area and spanning both, their sum, and real patches per cluster that holds real patches."""
    pad_only, real_only, mixed = [], [], []
    for ids in maps.values():
        ids = ids[0]
        inside, outside = set(ids[real].tolist()), set(ids[~real].tolist())
        both = inside & outside
        pad_only.append(len(outside - both))
        real_only.append(len(inside - both))
        mixed.append(len(both))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    total = mean(pad_only) + mean(real_only) + mean(mixed)
    return dict(blocks=len(maps), total=total, padding_only=mean(pad_only), real_only=mean(real_only),
                mixed=mean(mixed),
                real_patches_per_cluster=int(real.sum()) / (mean(real_only) + mean(mixed)),
                per_block={int(b): dict(padding_only=p, real_only=r, mixed=m)
                           for b, p, r, m in zip(maps, pad_only, real_only, mixed)})


def feature_error(output: torch.Tensor, reference: torch.Tensor, real: torch.Tensor) -> dict:
    """Relative Frobenius error and mean per-location cosine similarity on the real area."""
    out, ref = output[0][:, real], reference[0][:, real]  # [C, real patches]
    return dict(relative_error=float((out - ref).norm() / ref.norm()),
                cosine=float(torch.nn.functional.cosine_similarity(out, ref, dim=0).mean()))


def evaluate(encoder, image: torch.Tensor, real: torch.Tensor, reference: torch.Tensor) -> dict:
    """One forward of the reduced ``encoder``: its cluster counts and its real-area feature error."""
    from atc_det.vitdet_block import collect_source_maps

    captured = {}
    hook = encoder.register_forward_hook(lambda module, args, output: captured.update(output=output))
    try:
        start = time.perf_counter()
        with counted_slots() as slots:
            maps = collect_source_maps(encoder, image)
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    counts = cluster_counts(maps, real)
    computed = sum(slots) / len(slots)
    return dict(computed=computed, window_padding=computed - counts["total"], **counts,
                **feature_error(captured["output"], reference, real), forward_s=seconds)


def real_area_rate_for(total: float, windows: list[dict]) -> float:
    """The real-area keep rate whose clusters computed per block (real clusters, one per window
    with SAM padding, one per window with window padding) come closest to ``total``."""
    from atc_det.reduction import kept_tokens

    def spent(rate: float) -> int:
        return sum((kept_tokens(rate, w["real"]) if w["real"] else 0) + int(w["padding"] > 0)
                   + int(w["window_padding"] > 0) for w in windows)

    rates = [i / 1000 for i in range(1, 1000)]
    return min(rates, key=lambda rate: (abs(spent(rate) - total), rate))


def study(photo: np.ndarray, positions: str, keep: float, linkage: str, tiny: float, steps: int) -> dict:
    """Every policy on ``photo`` with SAM-B's encoder (random weights, ``positions``)."""
    import copy

    from segment_anything import sam_model_registry

    from atc_det import apply_atc

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"](checkpoint=None).eval()
    encoder = sam.image_encoder
    grid = encoder.pos_embed.shape[1]
    if positions == "sincos":
        encoder.pos_embed.data.copy_(sincos_position_embedding(grid, encoder.pos_embed.shape[-1]))
    image, input_hw = sam_input(photo, sam)
    real = real_patches(input_hw, grid)
    windows = window_counts(real)
    reference = encoder(image)

    def reduced(**options):
        return apply_atc(copy.deepcopy(encoder), linkage=linkage, **options)

    policies = {}

    def run(name: str, model, **extra) -> dict:
        policies[name] = dict(evaluate(model, image, real, reference), **extra)
        row = policies[name]
        print(f"  {positions}: {name}: {row['computed']:.1f} clusters / block ({row['padding_only']:.1f} "
              f"padding, {row['mixed']:.1f} mixed), error {row['relative_error']:.4f}", file=sys.stderr, flush=True)
        return row

    fixed = run(f"keep {keep:g}", reduced(keep_rate=keep), keep_rate=keep)
    run(f"real-area keep {keep:g}", reduced(keep_rate=keep, real_area=True), real_keep_rate=keep)
    rate = real_area_rate_for(fixed["computed"], windows)
    run(f"real-area keep {rate:g} (budget of keep {keep:g})", reduced(keep_rate=rate, real_area=True),
        real_keep_rate=rate)
    run(f"threshold {tiny:g} (equal keys only)", reduced(threshold=tiny), threshold=tiny)
    # Bisection on log t: clusters fall as t rises; the closest of the tries is kept.
    low, high, tries = math.log(1e-6), math.log(2.0), []
    for _ in range(steps):
        t = math.exp((low + high) / 2)
        row = evaluate(reduced(threshold=t), image, real, reference)
        tries.append((abs(row["computed"] - fixed["computed"]), t, row))
        low, high = (low, math.log(t)) if row["computed"] < fixed["computed"] else (math.log(t), high)
    _, t, row = min(tries, key=lambda item: item[0])
    policies[f"threshold {t:.3g} (budget of keep {keep:g})"] = dict(row, threshold=t)
    print(f"  {positions}: threshold {t:.3g}: {row['computed']:.1f} clusters / block, error "
          f"{row['relative_error']:.4f}", file=sys.stderr, flush=True)
    return dict(positions=positions, input_hw=list(input_hw), grid=grid,
                real_patches=int(real.sum()), padding_patches=int((~real).sum()), windows=windows,
                policies=policies)


def window_summary(windows: list[dict]) -> dict:
    valid = [w for w in windows if w["real"] + w["padding"]]
    return dict(windows=len(windows),
                all_padding=sum(w["real"] == 0 for w in valid),
                mostly_padding=sum(w["padding"] > w["real"] for w in valid),
                mixed=sum(w["real"] > 0 and w["padding"] > 0 for w in valid),
                all_real=sum(w["padding"] == 0 for w in valid))


def report_lines(result: dict) -> list[str]:
    lines = []
    for variant in result["variants"]:
        lines += ["", f"Position embeddings: {variant['positions']}", "",
                  "| policy | clusters computed / block | wholly SAM padding | wholly real | spanning both "
                  "| window padding | share on SAM padding | real patches / cluster | rel. error (real area) "
                  "| cosine (real area) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, p in variant["policies"].items():
            lines.append(f"| {name} | {p['computed']:.1f} | {p['padding_only']:.1f} | {p['real_only']:.1f} | "
                         f"{p['mixed']:.1f} | {p['window_padding']:.1f} | {p['padding_only'] / p['computed']:.1%} | "
                         f"{p['real_patches_per_cluster']:.2f} | {p['relative_error']:.4f} | {p['cosine']:.4f} |")
    return lines


def picture(photo: np.ndarray, encoder_variant: str, keep: float, linkage: str, rate: float,
            threshold: float, block: int, path: Path) -> None:
    """The padded input with the cluster borders of ``block`` under three policies, side by side."""
    import copy

    from PIL import Image, ImageDraw
    from segment_anything import sam_model_registry

    from atc_det import apply_atc
    from atc_det.visualize import draw_cluster_borders, pixel_cluster_map
    from atc_det.vitdet_block import collect_source_maps

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"](checkpoint=None).eval()
    encoder = sam.image_encoder
    if encoder_variant == "sincos":
        encoder.pos_embed.data.copy_(sincos_position_embedding(64, encoder.pos_embed.shape[-1]))
    image, _ = sam_input(photo, sam)
    # What the encoder sees: the photo, and SAM's zero padding, which is the pixel mean.
    shown = (image[0] * sam.pixel_std + sam.pixel_mean).clamp(0, 255).permute(1, 2, 0).byte().numpy()
    shown = np.asarray(Image.fromarray(shown).resize((512, 512), Image.BILINEAR))
    panels = [(f"keep {keep:g}", dict(keep_rate=keep)),
              (f"real-area keep {rate:g}", dict(keep_rate=rate, real_area=True)),
              (f"threshold {threshold:.3g}", dict(threshold=threshold))]
    tiles = []
    for title, options in panels:
        ids = collect_source_maps(apply_atc(copy.deepcopy(encoder), linkage=linkage, **options), image)[block][0]
        tile = Image.fromarray(draw_cluster_borders(shown, pixel_cluster_map(ids, PATCH, (1024, 1024), (512, 512))))
        ImageDraw.Draw(tile).text((6, 492), f"{title}: block {block}, {len(ids.unique())} clusters", fill=(255, 0, 0))
        tiles.append(np.asarray(tile))
    Image.fromarray(np.concatenate(tiles, 1)).save(path, optimize=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--photo", default="voc", help="a photo of benchmarks/fixtures/photos.py (default voc)")
    parser.add_argument("--keep", type=float, default=0.5, help="the fixed keep rate compared (default 0.5)")
    parser.add_argument("--linkage", default="average", choices=["average", "complete", "single"])
    parser.add_argument("--positions", nargs="+", default=list(POSITIONS), choices=POSITIONS)
    parser.add_argument("--tiny", type=float, default=1e-5, help="the 'equal keys only' threshold")
    parser.add_argument("--steps", type=int, default=10, help="bisection steps of the equal-budget threshold")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path, help="cluster borders of --png-block under three policies "
                        "(the last --positions variant)")
    parser.add_argument("--png-block", type=int, default=1)
    args = parser.parse_args(argv)
    from benchmarks.fixtures.photos import PHOTO_FILES

    if args.photo not in PHOTO_FILES:
        parser.error(f"--photo must be one of {', '.join(PHOTO_FILES)}, got {args.photo!r}")
    if not 0 < args.keep < 1:
        parser.error(f"--keep must be in (0, 1), got {args.keep:g}")
    if not args.tiny >= 0 or args.steps < 1:
        parser.error("--tiny must be >= 0 and --steps >= 1")
    if not 1 <= args.png_block <= 11:
        parser.error(f"--png-block must be a reduced block of SAM-B (1-11), got {args.png_block}")
    for path in (args.json, args.png):
        if path is not None and not path.parent.is_dir():
            parser.error(f"no directory {path.parent}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.fixtures.machine import machine
    from benchmarks.fixtures.photos import load_photo

    torch.set_grad_enabled(False)
    photo = load_photo(args.photo)
    variants = [study(photo, positions, args.keep, args.linkage, args.tiny, args.steps)
                for positions in args.positions]
    first = variants[0]
    result = dict(command="python benchmarks/sam_padding.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  machine=machine(), date=str(datetime.date.today()), photo=args.photo,
                  photo_hw=list(photo.shape[:2]), input_hw=first["input_hw"], grid=first["grid"],
                  real_patches=first["real_patches"], padding_patches=first["padding_patches"],
                  window_summary=window_summary(first["windows"]), variants=variants)
    summary = result["window_summary"]
    lines = [f"SAM-B image encoder (random weights), photo {args.photo} {photo.shape[0]}x{photo.shape[1]} -> "
             f"{first['input_hw'][0]}x{first['input_hw'][1]} + padding to 1024x1024; patch grid "
             f"{first['grid']}x{first['grid']}: {first['real_patches']} real patches, {first['padding_patches']} "
             f"padding ({first['padding_patches'] / first['grid'] ** 2:.0%}); {summary['windows']} windows "
             f"of 14x14: {summary['all_real']} all real, {summary['mixed']} mixed, {summary['all_padding']} "
             f"all padding, {summary['mostly_padding']} mostly padding; linkage {args.linkage}; {machine()}"]
    lines += report_lines(result)
    print("\n".join(lines), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.png is not None:
        last = variants[-1]["policies"]
        rate = next(p["real_keep_rate"] for n, p in last.items() if n.startswith("real-area") and "budget" in n)
        threshold = next(p["threshold"] for n, p in last.items() if n.startswith("threshold") and "budget" in n)
        picture(photo, variants[-1]["positions"], args.keep, args.linkage, rate, threshold, args.png_block, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
