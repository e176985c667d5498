"""Merged-token maps (atc_det.visualize, tools/visualize_merged_tokens.py) on the toy ViTDet
with random weights; references: NumPy's kron, PIL's nearest resize, SciPy's ndimage.mean."""
import importlib.util
import os

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from atc_det import visualize
from atc_det.engine import Trainer, load_config

TOY_CONFIG = "configs/toy_vitdet.yaml"
ATC_OPTS = ["MODEL.ATC.ENABLED", "True", "MODEL.ATC.BLOCKS", "[1, 2, 3]"]
WINDOW, PATCH = 8, 16  # configs/toy_vitdet.yaml: MODEL.VIT.WINDOW_SIZE, PATCH_SIZE


def load_tool(repo_root):
    path = os.path.join(repo_root, "tools", "visualize_merged_tokens.py")
    spec = importlib.util.spec_from_file_location("visualize_merged_tokens", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy(repo_root):
    cfg = load_config(os.path.join(repo_root, TOY_CONFIG), ATC_OPTS)
    torch.manual_seed(0)
    return cfg, Trainer.build_model(cfg).eval()


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("method", ["atc", "tome", "kmedoids"])
@pytest.mark.parametrize("keep_rate", [0.75, 0.5, 0.25, 0.1])
@pytest.mark.parametrize("height,width", [(256, 256), (171, 256)])
def test_distinct_clusters_per_window_equal_k(toy, method, keep_rate, height, width):
    cfg, model = toy
    visualize.set_atc(model, cfg, keep_rate, method)
    try:
        maps = visualize.source_maps_for_image(model, random_image(height, width))
    finally:
        visualize.set_atc(model, cfg)
    assert sorted(maps) == [1, 2, 3]
    k = int(keep_rate * WINDOW * WINDOW)  # every window is full: SFP pads the input to 256x256
    for block, ids in maps.items():
        assert ids.shape == (256 // PATCH, 256 // PATCH) and ids.dtype == torch.long
        windows = ids.reshape(2, WINDOW, 2, WINDOW).permute(0, 2, 1, 3).reshape(4, -1)
        counts = [len(np.unique(w.numpy())) for w in windows]
        assert counts == [k] * 4, (block, counts)
        # ids are unique within the image: no id in two windows
        assert len(np.unique(ids.numpy())) == 4 * k


@pytest.mark.parametrize("keep_rate", [0.5, 0.3])
def test_windows_with_padding_keep_the_same_fraction_of_their_tokens(repo_root, keep_rate):
    # No square pad: Detectron2 does not pad the 171x256 input (SimpleFeaturePyramid's
    # padding_constraints spell "size_divisiblity"), the patch embedding sees 10x16 patches, and
    # the lower 8x8 windows hold 2 rows of tokens and 6 rows of window padding (not in the map).
    cfg = load_config(os.path.join(repo_root, TOY_CONFIG), ATC_OPTS + ["MODEL.SFP.SQUARE_PAD", "0"])
    torch.manual_seed(0)
    model = visualize.set_atc(Trainer.build_model(cfg).eval(), cfg, keep_rate)
    maps = visualize.source_maps_for_image(model, random_image(171, 256))
    for ids in maps.values():
        assert ids.shape == (10, 16)
        counts = [len(np.unique(ids[r : r + WINDOW, c : c + WINDOW].numpy())) for r in (0, 8) for c in (0, 8)]
        assert counts == [int(keep_rate * 64)] * 2 + [int(keep_rate * 16)] * 2


def test_image_scope_clusters_global_blocks_over_the_whole_image(toy):
    cfg, model = toy
    cfg_image = cfg.clone()
    cfg_image.defrost()
    cfg_image.MODEL.ATC.SCOPE = "image"
    visualize.set_atc(model, cfg_image, 0.25)
    try:
        maps = visualize.source_maps_for_image(model, random_image(256, 256))
    finally:
        visualize.set_atc(model, cfg)
    # toy: blocks 0 and 2 are windowed, 1 and 3 global (MODEL.VIT.WINDOW_BLOCK_INDEXES [0, 2])
    assert len(np.unique(maps[1].numpy())) == len(np.unique(maps[3].numpy())) == round(0.25 * 256)
    windows = maps[2].reshape(2, WINDOW, 2, WINDOW).permute(0, 2, 1, 3).reshape(4, -1)
    assert [len(np.unique(w.numpy())) for w in windows] == [16] * 4


def test_source_maps_need_reduced_blocks(repo_root):
    cfg = load_config(os.path.join(repo_root, TOY_CONFIG))
    with pytest.raises(ValueError, match="MODEL.ATC.ENABLED"):
        visualize.source_maps_for_image(Trainer.build_model(cfg).eval(), random_image(64, 64))
    with pytest.raises(TypeError, match="backbone.net"):
        visualize.source_maps_for_image(torch.nn.Linear(2, 2), random_image(64, 64))


def test_pixel_map_is_nearest_upsampling_of_the_patch_grid():
    patch_map = torch.from_numpy(np.random.default_rng(0).integers(0, 50, (5, 6)))
    full = np.kron(patch_map.numpy(), np.ones((16, 16), dtype=np.int64))
    # image 70x90 covered by 5x6 patches of 16: the padding beyond the image is cropped
    np.testing.assert_array_equal(visualize.pixel_cluster_map(patch_map, 16, (70, 90)), full[:70, :90])
    reference = Image.fromarray(full[:70, :90].astype(np.int32), mode="I").resize((45, 35), Image.NEAREST)
    np.testing.assert_array_equal(
        visualize.pixel_cluster_map(patch_map, 16, (70, 90), (35, 45)), np.asarray(reference)
    )
    # an unpadded 100x90 input whose patch embedding saw 5x5 patches: the rest takes the last
    grid = patch_map[:, :5]
    clamped = np.pad(np.kron(grid.numpy(), np.ones((16, 16), dtype=np.int64)), ((0, 20), (0, 10)), "edge")
    np.testing.assert_array_equal(visualize.pixel_cluster_map(grid, 16, (100, 90)), clamped)


def test_paint_clusters_uses_each_clusters_mean_colour():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    labels = rng.integers(0, 7, (40, 50)) * 3 + 5  # arbitrary, non-contiguous ids
    painted = visualize.paint_clusters(image, labels)
    ids = np.unique(labels)
    for c in range(3):
        means = np.rint(scipy.ndimage.mean(image[..., c], labels, ids)).astype(np.uint8)
        np.testing.assert_array_equal(painted[..., c], means[np.searchsorted(ids, labels)])


def test_borders_are_drawn_where_a_neighbour_is_in_another_cluster():
    labels = np.zeros((6, 8), dtype=np.int64)
    labels[:, 5:] = 1
    labels[4:, :] = 2
    image = np.zeros((6, 8, 3), dtype=np.uint8)
    drawn = visualize.draw_cluster_borders(image, labels, (255, 0, 0))
    expected = np.zeros((6, 8), dtype=bool)
    expected[:4, 4] = True  # left of the 0 | 1 edge
    expected[3, :] = True  # above the 0/1 | 2 edge
    np.testing.assert_array_equal(drawn[..., 0] == 255, expected)
    assert not image.any()  # input untouched
    # default colour: white on dark pixels, black on light ones
    np.testing.assert_array_equal(visualize.draw_cluster_borders(image, labels).all(-1), expected)
    light = np.full_like(image, 200)
    np.testing.assert_array_equal(visualize.draw_cluster_borders(light, labels).any(-1), ~expected)


def test_sheet_places_every_tile_at_its_documented_position():
    rng = np.random.default_rng(2)
    tiles = [[rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(3)] for _ in range(2)]
    sheet = visualize.make_sheet(tiles, [["a", "b", "c"], ["d", "e", "f"]])
    pad, caption = visualize.SHEET_PAD, visualize.CAPTION_HEIGHT
    assert sheet.shape == (pad + 2 * (caption + 30 + pad), pad + 3 * (40 + pad), 3)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            top, left = pad + r * (caption + 30 + pad) + caption, pad + c * (40 + pad)
            np.testing.assert_array_equal(sheet[top : top + 30, left : left + 40], tile)
    # captions stay above their own tile (a long one is clipped at the tile's right edge)
    long = visualize.make_sheet([[tiles[0][0]] * 2], [["x" * 200, ""]])
    assert (long[pad : pad + caption, pad + 40 :] == 255).all()
    with pytest.raises(ValueError, match="one shape"):
        visualize.make_sheet([[tiles[0][0], tiles[0][0][:10]]], [["a", "b"]])


def run_tool(repo_root, input_path, output, *extra):
    load_tool(repo_root).main(
        ["--config", os.path.join(repo_root, TOY_CONFIG), "--input", str(input_path),
         "--output", str(output), "--tile-size", "128", *extra, *ATC_OPTS]
    )


def test_tool_writes_pngs_of_the_right_size_and_the_same_bytes_twice(repo_root, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(random_image(256, 256, 3)).save(photos / "square.png")
    Image.fromarray(random_image(200, 300, 4)).save(photos / "wide.jpg")
    (photos / "notes.txt").write_text("not an image")
    args = ["--keep-rates", "0.5", "0.25", "--methods", "random"]  # seeded random clusters
    run_tool(repo_root, photos, tmp_path / "a", *args)
    run_tool(repo_root, photos, tmp_path / "b", *args)
    # DefaultPredictor's resize for MIN_SIZE_TEST = MAX_SIZE_TEST = 256: 200x300 -> 171x256
    input_hw = {"square": (256, 256), "wide": (171, 256)}
    tile_hw = {"square": (128, 128), "wide": (86, 128)}
    pad, caption = visualize.SHEET_PAD, visualize.CAPTION_HEIGHT
    names = ["block1", "block2", "block3", "blocks", "compare", "predictions"]
    for stem, (height, width) in input_hw.items():
        assert sorted(p.stem for p in (tmp_path / "a" / stem).iterdir()) == names
        th, tw = tile_hw[stem]
        expected = {name: (width, height) for name in ["block1", "block2", "block3", "predictions"]}
        expected["blocks"] = (pad + 5 * (tw + pad), pad + caption + th + pad)  # input, 3 blocks, preds
        expected["compare"] = (pad + 4 * (tw + pad), pad + 2 * (caption + th + pad))  # 2 rows
        for name, size in expected.items():
            first = (tmp_path / "a" / stem / f"{name}.png").read_bytes()
            with Image.open(tmp_path / "a" / stem / f"{name}.png") as image:
                assert image.size == size and image.mode == "RGB", (stem, name)
            assert first == (tmp_path / "b" / stem / f"{name}.png").read_bytes(), (stem, name)


def test_tool_names_an_unreadable_image(repo_root, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        run_tool(repo_root, broken, tmp_path / "out")


def test_tool_rejects_a_folder_without_images_in_one_line(tmp_path, tool_error):
    (tmp_path / "empty").mkdir()
    line = tool_error("visualize_merged_tokens.py", "--config", TOY_CONFIG, "--input",
                      str(tmp_path / "empty"), "--output", str(tmp_path / "out"), *ATC_OPTS)
    assert line == (
        f"error: folder {str(tmp_path / 'empty')!r} holds no image files "
        f"(extensions {', '.join(visualize.IMAGE_EXTENSIONS)})"
    )


# Arguments with "{tmp}": the test's tmp_path, which holds broken.png (not an image).
@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "{tmp}/missing"], "input '{tmp}/missing' is neither an image file nor a folder"),
        (["--input", "{tmp}/broken.png"], "cannot read image '{tmp}/broken.png'"),
        (["--input", "{tmp}/broken.png", "MODEL.ATC.KEEP_RATIO", "0.5"], "unknown config key"),
        (["--input", "{tmp}/broken.png", "MODEL.WEIGHTS", "{tmp}/missing.pth"],
         "MODEL.WEIGHTS '{tmp}/missing.pth' is not a file"),
    ],
)
def test_tool_bad_input_is_one_clear_error(args, message, tmp_path, tool_error):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    line = tool_error("visualize_merged_tokens.py", "--config", TOY_CONFIG, "--output", str(tmp_path / "out"),
                      *(a.format(tmp=tmp_path) for a in args))
    assert message.format(tmp=tmp_path) in line
