"""tools/train_net.py end to end on the toy dataset: training, evaluation, resume, DDP, errors."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

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
        results = json.load(f)
    toy = os.path.join(small_toy["DETECTRON2_DATASETS"], "toy_shapes")
    with open(os.path.join(toy, "annotations", "val.json")) as f:
        val = json.load(f)
    image_ids = {image["id"] for image in val["images"]}
    category_ids = {category["id"] for category in val["categories"]}
    assert results
    for result in results:
        assert result["image_id"] in image_ids and result["category_id"] in category_ids, result
        assert "bbox" in result and "segmentation" in result, result


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
    assert "Rank of current process: 0. World size: 2" in log
    assert os.path.isfile(os.path.join(out, "model_final.pth"))


def test_checkpoints_are_written_atomically_through_the_path_manager(tmp_path, monkeypatch):
    """Checkpointer.save writes each file through its path manager under a temporary name, then
    renames it: a save that fails midway leaves the last checkpoint and its tag as they were."""
    from atc_det.engine import Checkpointer

    model = torch.nn.Linear(3, 2)
    checkpointer = Checkpointer(model, save_dir=str(tmp_path))
    path_manager, opened = checkpointer.path_manager, []
    real_open = path_manager.open
    monkeypatch.setattr(path_manager, "open", lambda path, mode="r", **kwargs: (
        opened.append((os.path.basename(path), mode)) or real_open(path, mode, **kwargs)))
    checkpointer.save("model_final", iteration=7)
    assert opened == [("model_final.pth.tmp", "wb"), ("last_checkpoint.tmp", "w")]
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]
    saved = torch.load(tmp_path / "model_final.pth")
    assert saved["iteration"] == 7 and torch.equal(saved["model"]["weight"], model.weight.detach())
    good = (tmp_path / "model_final.pth").read_bytes()

    def fail_midway(data, f) -> None:
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", fail_midway)
    for name in ("model_final", "model_0000009"):
        with pytest.raises(OSError, match="No space left"):
            checkpointer.save(name)
        assert (tmp_path / "model_final.pth").read_bytes() == good
        assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
        assert not (tmp_path / "model_0000009.pth").exists()
    assert checkpointer.path_manager is path_manager


def other_model_weights(folder) -> str:
    """A checkpoint of another model: its one key is not the toy model's."""
    path = os.path.join(folder, "other_model.pth")
    torch.save({"model": {"backbone.net.not_a_parameter": torch.zeros(3)}}, path)
    return path


TOY_EVAL = ["--config", "configs/toy_vitdet.yaml", "--eval-only"]


# Arguments with "{tmp}": the test's tmp_path, which holds other_model.pth.
@pytest.mark.parametrize(
    "args, message",
    [
        ([*TOY_EVAL, "MODEL.ATC.KEEP_RATIO", "0.5"],
         "unknown config key: Non-existent key: MODEL.ATC.KEEP_RATIO"),
        ([*TOY_EVAL, "DATASETS.TEST", "('coco_2017_val',)"], "coco/annotations/instances_val2017.json"),
        (["--config", "{tmp}/missing.yaml"], "config file '{tmp}/missing.yaml' not found"),
        ([*TOY_EVAL, "SOLVER.MAX_ITER", "many"], "Type mismatch"),
        ([*TOY_EVAL, "MODEL.WEIGHTS", "{tmp}/missing.pth"], "MODEL.WEIGHTS '{tmp}/missing.pth' is not a file"),
        ([*TOY_EVAL, "MODEL.ATC.ENABLED", "True", "MODEL.ATC.KEEP_RATE", "[1.5]"],
         "(MODEL.ATC.KEEP_RATE) is the fraction"),
        ([*TOY_EVAL, "MODEL.ATC.ENABLED", "True", "MODEL.SEC.ENABLED", "True"],
         "MODEL.ATC.ENABLED and MODEL.SEC.ENABLED are both True"),
        # found while the model is built and loaded (in the process: one GPU or CPU)
        ([*TOY_EVAL, "MODEL.WEIGHTS", "{tmp}/other_model.pth"],
         "checkpoint keys don't match the model (missing in the checkpoint: ['backbone."),
        (["--config", "configs/toy_vitdet.yaml", "MODEL.WEIGHTS", "{tmp}/other_model.pth"],
         "not in the model: ['backbone.net.not_a_parameter']"),
    ],
)
def test_bad_input_is_one_clear_error(args, message, tmp_path, small_toy, tool_error):
    other_model_weights(tmp_path)
    line = tool_error("train_net.py", *(a.format(tmp=tmp_path) for a in args), "OUTPUT_DIR",
                      str(tmp_path / "out"), env=small_toy)
    assert message.format(tmp=tmp_path) in line


def test_vitdet_b_without_coco_says_where_the_data_goes(tmp_path, tool_error):
    line = tool_error("train_net.py", "--config", "configs/vitdet_b.yaml",
                      env={"DETECTRON2_DATASETS": str(tmp_path)})
    assert "coco/annotations/instances_val2017.json, " in line
    assert "datasets/README.md" in line


def test_bad_weights_in_two_processes_exit_2_without_traceback(small_toy, tmp_path):
    """A worker prints the error line and exits 2 (the other may be stopped before it prints
    its own); the launcher exits 2 too, quietly."""
    p = run(["--config", "configs/toy_vitdet.yaml", "--num-gpus", "2", *FAST, "MODEL.WEIGHTS",
             other_model_weights(tmp_path), "OUTPUT_DIR", str(tmp_path / "out")], small_toy)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert errors and all("checkpoint keys don't match the model" in e for e in errors), errors
