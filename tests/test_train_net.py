"""tools/train_net.py end to end on the toy dataset: training, evaluation, resume, DDP, errors."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
# A smaller toy model and data loading for quick runs.
FAST = [
    "MODEL.VIT.EMBED_DIM", "64", "MODEL.VIT.NUM_HEADS", "2", "MODEL.VIT.DEPTH", "2",
    "MODEL.VIT.WINDOW_BLOCK_INDEXES", "[0]", "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2",
]


def run(args, env_extra=None, timeout=600, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(
        [sys.executable, TRAIN_NET, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout, **kw,
    )


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory):
    """A small toy dataset (16 train / 8 val images) under a private DETECTRON2_DATASETS."""
    from atc_det.data.toy_shapes import generate_toy_shapes

    root = tmp_path_factory.mktemp("d2data")
    generate_toy_shapes(str(root / "toy_shapes"), splits={"train": 16, "val": 8})
    return {"DETECTRON2_DATASETS": str(root)}


def test_train_then_eval_only(small_toy, tmp_path):
    out = str(tmp_path / "out")
    p = run(["--config", "configs/toy_vitdet.yaml", *FAST, "SOLVER.MAX_ITER", "4",
             "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", out], small_toy)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^bbox AP: \d+\.\d\d  AP50: ", p.stdout, re.M), p.stdout[-2000:]
    assert re.search(r"^segm AP: \d+\.\d\d  AP50: ", p.stdout, re.M)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    p = run(["--config-file", "configs/toy_vitdet.yaml", "--eval-only", *FAST,
             "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", out], small_toy)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"^segm AP: \d+\.\d\d  AP50: ", p.stdout, re.M)
    with open(os.path.join(out, "inference", "toy_shapes_val", "coco_instances_results.json")) as f:
        assert isinstance(json.load(f), list)


def test_resume_after_kill_loses_only_iterations_since_last_checkpoint(small_toy, tmp_path):
    out = str(tmp_path / "out")
    args = ["--config", "configs/toy_vitdet.yaml", *FAST, "SOLVER.MAX_ITER", "400",
            "SOLVER.CHECKPOINT_PERIOD", "3", "DATASETS.TEST", "()", "OUTPUT_DIR", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", **small_toy)
    proc = subprocess.Popen([sys.executable, TRAIN_NET, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tag = os.path.join(out, "last_checkpoint")
    deadline = time.time() + 300
    while time.time() < deadline and not (
        os.path.exists(tag) and open(tag).read().strip() != "model_0000002.pth"
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # killed at an arbitrary moment, maybe mid-write
    proc.wait()
    last = open(tag).read().strip()
    saved_iter = int(last.split("_")[1].split(".")[0])
    assert saved_iter >= 5
    p = run(["--resume", *args[:-6], "SOLVER.MAX_ITER", str(saved_iter + 3),
             "SOLVER.CHECKPOINT_PERIOD", "3", "DATASETS.TEST", "()", "OUTPUT_DIR", out], small_toy)
    assert p.returncode == 0, p.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert f"Loading from {os.path.join(out, last)}" in log
    assert f"Starting training from iteration {saved_iter + 1}" in log


def test_two_process_cpu_training(small_toy, tmp_path):
    out = str(tmp_path / "out")
    p = run(["--config", "configs/toy_vitdet.yaml", "--num-gpus", "2", *FAST,
             "SOLVER.MAX_ITER", "3", "DATASETS.TEST", "()", "OUTPUT_DIR", out], small_toy)
    assert p.returncode == 0, p.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "world size: 2" in log.lower() or "Rank of current process: 0. World size: 2" in log
    assert os.path.isfile(os.path.join(out, "model_final.pth"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["MODEL.ATC.KEEP_RATIO", "0.5"], "unknown config key: Non-existent key: MODEL.ATC.KEEP_RATIO"),
        (["DATASETS.TEST", "('coco_2017_val',)"], "coco/annotations/instances_val2017.json"),
    ],
)
def test_bad_input_is_one_clear_error(args, message, tmp_path, small_toy):
    env = {"DETECTRON2_DATASETS": str(tmp_path)}
    p = run(["--config", "configs/toy_vitdet.yaml", "--eval-only", *args], env)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], p.stderr[-2000:]


def test_vitdet_b_without_coco_says_where_the_data_goes(tmp_path):
    p = run(["--config", "configs/vitdet_b.yaml"], {"DETECTRON2_DATASETS": str(tmp_path)})
    assert p.returncode == 2
    assert "coco/annotations/instances_val2017.json, " in p.stderr
    assert "datasets/README.md" in p.stderr
