"""tools/offshelf.py on the small toy: a cell gives what tools/train_net.py --eval-only gives with
the same MODEL.ATC.* setting (predictions, and AP recomputed with pycocotools), a rerun skips
finished cells, bad input is one error line, and the LazyConfig toy runs through the same tool."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_train_net import FAST, other_model_weights, run as run_train_net

OFFSHELF = os.path.join(ROOT, "tools", "offshelf.py")
# Detections at any score (ten per image): an untrained model still predicts boxes to compare.
YACS = [*FAST, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "10"]
LAZY = ["model.backbone.net.embed_dim=64", "model.backbone.net.num_heads=2", "model.backbone.net.depth=2",
        "model.backbone.net.window_block_indexes=[0]", "dataloader.test.num_workers=0",
        "model.roi_heads.box_predictor.test_score_thresh=0.0",
        "model.roi_heads.box_predictor.test_topk_per_image=10"]
PREDICTIONS = os.path.join("inference", "toy_shapes_val", "coco_instances_results.json")


def offshelf(args, env, check=True):
    p = subprocess.run([sys.executable, OFFSHELF, *args], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1", **env), timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def rows(folder):
    with open(os.path.join(folder, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def weights(small_toy, tmp_path_factory):
    """Seeded random weights of the small toy model (FAST), as a Detectron2 checkpoint."""
    from atc_det.engine import Trainer, load_config

    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, "configs", "toy_vitdet.yaml"), FAST)
    path = str(tmp_path_factory.mktemp("weights") / "model.pth")
    torch.save({"model": Trainer.build_model(cfg).state_dict()}, path)
    return path


def sweep_args(weights, output, methods=("atc:average",), *extra):
    return ["--config", "configs/toy_vitdet.yaml", "--weights", weights, "--keep", "0.5",
            "--methods", *methods, *extra, "--output", output, *YACS]


@pytest.fixture(scope="module")
def sweep(weights, small_toy, tmp_path_factory):
    """Stock + ATC average at keep 0.5; the ATC cell's predictions kept aside (the last cell's)."""
    out = str(tmp_path_factory.mktemp("sweep") / "out")
    p = offshelf(sweep_args(weights, out), small_toy)
    os.replace(os.path.join(out, PREDICTIONS), os.path.join(out, "atc_predictions.json"))
    return out, p.stdout


def coco_stats(annotations, predictions, task):
    """pycocotools' 12 numbers, x100 as Detectron2 reports them."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(annotations)
    evaluation = COCOeval(gt, gt.loadRes(predictions), task)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return [100 * s for s in evaluation.stats]


def test_cell_equals_train_net_eval_only(sweep, weights, small_toy, tmp_path):
    out, stdout = sweep
    stock, atc = rows(out)
    assert (stock["method"], atc["method"], atc["keep_rate"]) == ("stock", "atc:average", 0.5)
    assert "[2/2 cells] atc:average keep 0.5" in stdout
    reference = str(tmp_path / "ref")
    p = run_train_net(["--config", "configs/toy_vitdet.yaml", "--eval-only", *YACS, "MODEL.WEIGHTS", weights,
                       "MODEL.ATC.ENABLED", "True", "MODEL.ATC.KEEP_RATE", "[0.5]",
                       "MODEL.ATC.LINKAGE", "average", "OUTPUT_DIR", reference], small_toy)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(reference, PREDICTIONS)) as f:
        theirs = json.load(f)
    with open(os.path.join(out, "atc_predictions.json")) as f:
        ours = json.load(f)
    assert ours and len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert (a["image_id"], a["category_id"], a["segmentation"]) == (b["image_id"], b["category_id"], b["segmentation"])
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-5)
    for task, key in (("bbox", "box_ap"), ("segm", "mask_ap")):
        assert f"{task} AP: {atc[key]:.2f}" in p.stdout
        annotations = os.path.join(small_toy["DETECTRON2_DATASETS"], "toy_shapes", "annotations", "val.json")
        stats = coco_stats(annotations, os.path.join(out, "atc_predictions.json"), task)
        metrics = atc["results"][""][task]
        assert [metrics[k] for k in ("AP", "AP50", "AP75")] == pytest.approx(stats[:3], abs=1e-9)
    # The reduction acted: fewer backbone FLOPs and other features than stock (which has none).
    assert stock["feature_error"] == 0 and atc["feature_error"] > 0
    assert atc["feature_images"] == 8 and atc["timed_images"] == 8 - 5
    assert 0 < atc["backbone_gflops"] < stock["backbone_gflops"]
    assert all(r["backbone_ms"] > 0 and r["model_ms"] > r["backbone_ms"] for r in (stock, atc))
    assert {"ap_vs_ms.png", "ap_vs_keep.png", "results.md"} <= set(os.listdir(out))


def test_rerun_skips_finished_cells(sweep, weights, small_toy):
    out, _ = sweep
    before = rows(out)
    p = offshelf(sweep_args(weights, out, ("atc:average", "random")), small_toy)
    assert "offshelf: 3 cells, 2 already in" in p.stdout
    assert "[3/3 cells] random keep 0.5" in p.stdout and "[1/" not in p.stdout and "[2/" not in p.stdout
    after = rows(out)
    assert after[:2] == before  # not recomputed: same timestamps and numbers
    assert after[2]["method"] == "random" and after[2]["run_started"] != before[1]["run_started"]
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    assert all(f"| {m} | " in table for m in ("stock", "atc:average", "random"))


def test_results_of_other_arguments_are_one_error(sweep, weights, small_toy, tool_error):
    out, _ = sweep
    line = tool_error("offshelf.py", *sweep_args(weights, out, ("atc:average",), "--rel-pos", "mean"),
                      env=small_toy)
    assert "results.jsonl holds results of other arguments (rel_pos: None there, 'mean' now)" in line


@pytest.mark.parametrize("change, message", [
    ({"--methods": "atc:median"}, "unknown method 'atc:median'"),
    ({"--keep": "1.5"}, "keep rate 1.5 is outside (0, 1]"),
    ({"--weights": "{tmp}/missing.pth"}, "--weights '{tmp}/missing.pth' is not a file"),
    ({"DATASETS.TEST": "()"}, "the config has no evaluator: DATASETS.TEST is empty"),
    # found by the worker while it loads the weights
    ({"--weights": "{tmp}/other_model.pth"}, "checkpoint keys don't match the model"),
])
def test_bad_input_is_one_clear_error(change, message, weights, small_toy, tmp_path, tool_error):
    other_model_weights(tmp_path)
    args = sweep_args(weights, str(tmp_path / "out"))
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value.format(tmp=tmp_path)
        else:
            args += [flag, value]
    line = tool_error("offshelf.py", *args, env=small_toy)
    assert message.format(tmp=tmp_path) in line


def test_lazy_config_toy_runs_through_the_same_tool(weights, small_toy, tmp_path):
    """The ATC LazyConfig toy: its stock model, and complete linkage on top of its own ATC node."""
    out = str(tmp_path / "lazy")
    offshelf(["--config-file", "configs/toy/atc_mask_rcnn_vitdet_toy.py", "--weights", weights,
              "--keep", "0.25", "--methods", "atc:complete", "--output", out, *LAZY], small_toy)
    stock, atc = rows(out)
    assert stock["settings"]["config_file"].endswith(".py") and stock["box_ap"] is not None
    assert stock["feature_error"] == 0 < atc["feature_error"]
    arguments = atc["arguments"]
    assert (arguments["keep_rate"], arguments["linkage"], arguments["method"]) == (0.25, "complete", "atc")
    assert os.path.isfile(os.path.join(out, PREDICTIONS))


@pytest.mark.parametrize("name", ["tome:average", "sec:0", "atc:", "stock", "atc:ward"])
def test_unknown_methods(name):
    from atc_det.offshelf import check_keep_rates, check_method

    with pytest.raises(ValueError, match="unknown method"):
        check_method(name)
    with pytest.raises(ValueError, match="outside"):
        check_keep_rates([0.5, 0.0])


def test_killed_write_is_dropped_and_cells_are_planned(tmp_path):
    """A row cut short by a kill is dropped on the next read; stock first, SEC once."""
    from atc_det.offshelf import Cell, plan_cells, read_rows

    path = tmp_path / "results.jsonl"
    path.write_text('{"method": "stock", "keep_rate": 1.0}\n{"method": "tome", "keep_ra')
    assert read_rows(str(path)) == [{"method": "stock", "keep_rate": 1.0}]
    assert path.read_text() == '{"method": "stock", "keep_rate": 1.0}\n'
    assert plan_cells(["tome", "sec:2"], [0.5, 0.25]) == [
        Cell("stock", 1.0), Cell("tome", 0.5), Cell("tome", 0.25), Cell("sec:2", 1.0)]


def test_compare_puts_runs_side_by_side():
    from atc_det.offshelf import compare_markdown

    def row(method, keep, box):
        return {"method": method, "keep_rate": keep, "box_ap": box, "mask_ap": box / 2}

    table = compare_markdown({"a": [row("stock", 1.0, 20.0), row("random", 0.25, 12.0)],
                              "b": [row("stock", 1.0, 18.0), row("random", 0.25, 11.0)]})
    assert "| stock | 1 | 20.00 / 10.00 | 18.00 / 9.00 | 2.00 | +0.00, +0.00 |" in table
    assert "| random | 0.25 | 12.00 / 6.00 | 11.00 / 5.50 | 1.00 | -8.00, -7.00 |" in table
