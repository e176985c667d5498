"""What the GPU path of a reduced ViTDet block needs, checked on the CPU: one clustering call per
block, nothing outside it that waits for the device, and the Triton backend (through Triton's
interpreter) giving the native kernel's results inside the block."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from atc_det import apply_atc
from atc_det.modeling.atc_vit import ATCBlock, collect_source_maps
from atc_det.windows import group_tokens, window_real_counts
from atc_det.reduction import CLUSTERING_CALL
from conftest import small_vit, vit_features

# Ops that copy a device value to the host (or whose output size depends on the data).
HOST_SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")


def inside(event, name: str) -> bool:
    while event is not None:
        if event.name == name:
            return True
        event = event.cpu_parent
    return False


def assert_syncs_only_in_clustering(events, calls: int) -> None:
    """No host read outside the clustering calls, and ``calls`` clustering calls."""
    syncs = [e.name for e in events if (e.name in HOST_SYNCS or e.name.startswith("aten::unique"))
             and not inside(e, CLUSTERING_CALL)]
    assert not syncs, syncs
    assert sum(e.name == CLUSTERING_CALL for e in events) == calls


@pytest.mark.parametrize("mode, scope", [("dense", "window"), ("dense", "image"), ("merge", "window")])
def test_reduced_vit_forward_has_no_host_sync_outside_the_clustering_call(mode, scope):
    """ViT at 320 px (20 x 20 patches: full, edge and corner windows): the profiler sees no host
    read outside the clustering calls, and exactly one clustering call per reduction block."""
    vit = small_vit(img_size=320)
    apply_atc(vit, keep_rate=[0.5, 0.25], linkage="average", blocks=[1, 2], mode=mode, scope=scope)
    images = torch.randn(2, 3, 320, 320)
    vit_features(vit, images)  # warm-up (the native kernel is built and loaded)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        vit_features(vit, images)
    assert_syncs_only_in_clustering(prof.events(), calls=2)


@pytest.mark.parametrize("mode, scope", [("merge", "image"), ("dense", "window"), ("dense", "image")])
def test_timm_vit_forward_has_no_host_sync_outside_the_clustering_call(mode, scope):
    """timm's adapter, merge mode included: the real-token counts follow from the shapes, nothing
    is read back to the host outside the clustering calls."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=4).eval()
    apply_atc(model, keep_rate=0.5, blocks=[1, 2], mode=mode, scope=scope)
    images = torch.randn(2, 3, 224, 224)
    vit_features(model, images)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        vit_features(model, images)
    assert_syncs_only_in_clustering(prof.events(), calls=2)


def test_window_real_counts_match_the_padding_of_detectron2_windows():
    """The host's count of real tokens per window equals the padding of Detectron2's
    ``window_partition`` (through group_tokens' valid mask)."""
    for height, width in ((20, 20), (14, 14), (15, 29)):
        _, valid, _, _ = group_tokens(torch.zeros(1, height, width, 8), 14)
        assert valid.sum(1).tolist() == window_real_counts(height, width, 14)
    assert window_real_counts(20, 20, 0) == [400]


def test_reduced_vit_with_triton_backend_equals_native_backend():
    """Dense ATC (a windowed and a global block, padded windows) with backend="triton" run by
    Triton's interpreter: the same labels as the native kernel, so the same output (one linkage
    here: the kernel's per-linkage checks against the native kernel are in test_clustering.py)."""
    images = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(0))
    outputs, maps = [], []
    for backend in ("native", "triton"):
        vit = small_vit(img_size=320, depth=3, window_block_indexes=[0, 1])
        apply_atc(vit, keep_rate=0.5, linkage="average", blocks=[1, 2], backend=backend)
        assert all(isinstance(vit.blocks[i], ATCBlock) for i in (1, 2))
        outputs.append(vit_features(vit, images))
        maps.append(collect_source_maps(vit, images))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    for block in maps[0]:
        assert torch.equal(maps[0][block], maps[1][block])


def test_gpu_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/bench_gpu.py --device cpu at a small size: both tables, every model."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "report.md"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--device",
                             "cpu", "--size", "224", "--batch", "1", "--runs", "1", "--dtype", "float32",
                             "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = out.read_text()
    for linkage in ("single", "complete", "average"):
        assert f"| {linkage} | 1 x 196 |" in report
    for model in ("stock", "stock + SDPA", "ATC keep 0.75", "ATC keep 0.5", "ATC keep 0.25"):
        assert f"| 1 | float32 | {model} |" in report
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--device", "tpu"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr  # (import warnings may precede)
    assert bad.stderr.strip().splitlines()[-1] == "error: --device must be cuda or cpu, got 'tpu'"
