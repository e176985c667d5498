"""The reduced models under ``torch.compile`` and ``torch.export``: one graph (no graph break,
``fullgraph=True``), outputs and gradients equal to eager mode, no recompilation per K.

Most checks use Dynamo with the "eager" / "aot_eager" backends (the graph capture is what can
break; inductor adds code generation); one forward and one training step also go through inductor.
Models are tiny so that compiling stays cheap on the CPU."""
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import atc_det
from conftest import small_vit, vit_features

# Two input sizes: 20 x 28 patches (edge and corner windows padded) and 28 x 28 (no padding).
SIZES = [(320, 448), (448, 448)]
D2_SETTINGS = [
    dict(linkage="average"),
    dict(linkage="complete"),
    dict(linkage="single"),
    dict(scope="image"),
    dict(cluster_blocks=[1]),
    dict(mode="merge"),
]


def graph_breaks(model, images) -> int:
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explanation = torch._dynamo.explain(model)(images)
    return explanation.graph_break_count, explanation.graph_count


def images(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


def reduced_vit(**settings):
    """A 3-block ViT (windowed, global, windowed) reduced in blocks 1 and 2."""
    vit = small_vit(img_size=448, depth=3, window_block_indexes=[0, 2], drop_path_rate=0.0)
    return atc_det.apply_atc(vit, keep_rate=[0.5, 0.25], blocks=[1, 2], **settings)


def test_explain_finds_one_graph_and_no_break():
    vit = reduced_vit()
    assert graph_breaks(vit, images(*SIZES[0])) == (0, 1)


@pytest.mark.parametrize("settings", D2_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_detectron2_vit_with_atc_is_one_graph_equal_to_eager(settings):
    """fullgraph=True: any graph break is an error. Both sizes, each compiled once."""
    vit = reduced_vit(**settings)
    torch._dynamo.reset()
    compiled = torch.compile(vit, backend="aot_eager", fullgraph=True, dynamic=False)
    for height, width in SIZES:
        x = images(height, width)
        torch.testing.assert_close(vit_features(compiled, x), vit_features(vit, x), rtol=1e-4, atol=1e-4)


def test_query_chunks_of_the_rel_pos_mask_are_one_graph_equal_to_eager(monkeypatch):
    """The global block's attention in a few chunks of query rows (MASK_CHUNK_BYTES made small)."""
    from atc_det import vitdet_block

    monkeypatch.setattr(vitdet_block, "MASK_CHUNK_BYTES", 2**17)
    vit = reduced_vit()
    torch._dynamo.reset()
    compiled = torch.compile(vit, backend="aot_eager", fullgraph=True, dynamic=False)
    for height, width in SIZES:
        x = images(height, width)
        torch.testing.assert_close(vit_features(compiled, x), vit_features(vit, x), rtol=1e-4, atol=1e-4)


def test_sdpa_peer_is_one_graph():
    from atc_det.modeling import apply_fast_attention

    vit = apply_fast_attention(small_vit(img_size=448))
    x = images(*SIZES[0])
    torch._dynamo.reset()
    compiled = torch.compile(vit, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(vit_features(compiled, x), vit_features(vit, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("settings", [dict(mode="merge"), dict(mode="dense", scope="window")],
                         ids=["merge", "dense-window"])
def test_timm_vit_with_atc_is_one_graph_equal_to_eager(settings):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=4,
                              img_size=320).eval()
    atc_det.apply_atc(model, keep_rate=0.5, blocks=[1, 2], **settings)
    x = images(320, 320)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(vit_features(compiled, x), vit_features(model, x), rtol=1e-4, atol=1e-4)


def test_new_size_compiles_once_and_new_data_never():
    """dynamic=False: one compilation per input size; a seen size again, with other images (other
    clusters, the same K), compiles nothing. (dynamic=True: benchmarks/compile_recompiles.py.)"""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(reduced_vit(cluster_blocks=[1]), backend=counter, dynamic=False)
    frames = []
    for seed, (height, width) in enumerate(SIZES + SIZES[:1] * 2):
        vit_features(compiled, images(height, width, seed))
        frames.append(counter.frame_count)
    assert frames == [1, 2, 2, 2]


def test_threshold_mode_breaks_the_graph_where_k_is_read_and_runs_compiled():
    """Dynamic K: each clustering block reads its cluster counts back to the host (graph breaks),
    and the compiled model still equals eager. The first new K recompiles the graphs after the
    breaks once, with K dynamic (Dynamo's automatic dynamic shapes); later ones compile nothing."""
    vit = reduced_vit(threshold=0.3)
    x = images(*SIZES[0])
    breaks, _ = graph_breaks(vit, x)
    assert breaks > 0
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(vit, backend=counter)
    frames = []
    for seed in range(4):
        x = images(*SIZES[0], seed=seed)
        torch.testing.assert_close(vit_features(compiled, x), vit_features(vit, x), rtol=1e-4, atol=1e-4)
        frames.append(counter.frame_count)
    assert frames[1] <= frames[0] + 1 and frames[3] == frames[1], frames


def test_export_equals_eager():
    vit = reduced_vit()
    x = images(*SIZES[0])
    program = torch.export.export(vit, (x,))
    ops = {str(node.target) for module in program.graph_module.modules() if hasattr(module, "graph")
           for node in module.graph.nodes}
    assert "atc_det.agglomerative_clustering.default" in ops
    torch.testing.assert_close(program.module()(x)["last_feat"], vit_features(vit, x), rtol=1e-5, atol=1e-5)


def test_inductor_training_step_equals_eager():
    """A tiny reduced ViT through inductor: a training step (dense mode, gradients through the
    merged-token path) gives eager's output and gradients."""
    vit = small_vit(img_size=224, depth=2, embed_dim=32, num_heads=2, window_block_indexes=[0],
                    drop_path_rate=0.0)
    atc_det.apply_atc(vit, keep_rate=0.5, blocks=[0, 1])
    x = images(224, 224)
    torch._dynamo.reset()
    compiled = torch.compile(vit, fullgraph=True)
    vit.train()
    grads, outputs = [], []
    for model in (vit, compiled):
        vit.zero_grad()
        out = model(x)["last_feat"]
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append({name: p.grad.clone() for name, p in vit.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-5, msg=name)
