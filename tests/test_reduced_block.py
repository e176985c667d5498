"""The reduced block at the limit: centroid relative positions as an SDPA mask (against the
brute-force definition), label reuse (against per-block clustering with the same labels), AMP."""
import copy

import pytest
import torch

from atc_det.modeling import apply_atc, apply_fast_attention
from atc_det.vitdet_block import (
    centroid_query_terms,
    interpolation_weights,
    rel_pos_keys,
    rel_pos_mask,
    resized_rel_pos_table,
)
from atc_det.registry import _registered, get_method, register_method
from conftest import small_vit, vit_features


def brute_force_rel_pos(q, rows, cols, table_h, table_w, grid):
    """sum_ab wi[a] wj[b] q_i . R(a - b) per axis, with every lattice pair spelled out."""
    bias = 0
    for coord, table, size in ((rows, table_h, grid[0]), (cols, table_w, grid[1])):
        weights = interpolation_weights(coord, size)  # [A, L, S]
        lines = torch.arange(size)
        lattice = table[lines[:, None] - lines[None, :] + size - 1]  # [a, b, D]: R(a - b)
        bias = bias + torch.einsum("nhid,abd,nia,njb->nhij", q, lattice, weights, weights)
    return bias


@pytest.mark.parametrize("grid", [(14, 14), (9, 23)])
def test_centroid_mask_equals_the_definition_for_fractional_positions(grid):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 17, 8, generator=generator, dtype=torch.float64)
    rows = torch.rand(2, 17, generator=generator, dtype=torch.float64) * (grid[0] - 1)
    cols = torch.rand(2, 17, generator=generator, dtype=torch.float64) * (grid[1] - 1)
    rows[0, :3] = torch.tensor([0.0, grid[0] - 1.0, 4.0])  # lattice lines, both ends
    table_h = torch.randn(2 * grid[0] - 1, 8, generator=generator, dtype=torch.float64)
    table_w = torch.randn(2 * grid[1] - 1, 8, generator=generator, dtype=torch.float64)
    key_bias = torch.randn(2, 17, generator=generator, dtype=torch.float64)
    terms = torch.cat([centroid_query_terms(q, rows, table_h, grid[0]),
                       centroid_query_terms(q, cols, table_w, grid[1])], -1)
    weights = torch.cat([interpolation_weights(rows, grid[0]), interpolation_weights(cols, grid[1])], -1)
    got = rel_pos_mask(terms, rel_pos_keys(weights, key_bias))
    expected = brute_force_rel_pos(q, rows, cols, table_h, table_w, grid) + key_bias[:, None, None, :]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_centroid_and_mean_rel_pos_agree_when_nothing_is_merged():
    """Threshold 0 at 224 px (no padding): the merged-token path with single tokens."""
    stock = small_vit()
    images = torch.randn(1, 3, 224, 224)
    outs = {mode: vit_features(apply_atc(copy.deepcopy(stock), threshold=0.0, rel_pos=mode), images)
            for mode in ("centroid", "mean")}
    torch.testing.assert_close(outs["centroid"], outs["mean"], rtol=1e-4, atol=1e-5)
    assert resized_rel_pos_table(stock.blocks[1].attn.rel_pos_h, 20).shape[0] == 39


def recorded_labels():
    """A registered method that clusters with ATC and records the labels of every call."""
    calls = []

    def recording(metric, num_clusters, **options):
        labels = get_method("atc")(metric, num_clusters, **options)
        calls.append(labels)
        return labels
    return calls, recording


def replaying(calls):
    def replay(metric, num_clusters, **options):
        return calls.pop(0)
    return replay


@pytest.fixture
def methods():
    names = []

    def register(name, fn):
        register_method(name, fn)
        names.append(name)
    yield register
    for name in names:
        _registered.pop(name)


def test_label_reuse_equals_per_block_merging_with_the_same_labels(methods):
    """cluster_blocks=[1]: blocks 2 and 3 reuse block 1's partition. The same model clustering in
    every block with a method that hands blocks 2 and 3 block 1's labels gives the same output."""
    stock = small_vit(img_size=320)
    images = torch.randn(2, 3, 320, 320)
    calls, recording = recorded_labels()
    methods("recording", recording)
    reuse = apply_atc(copy.deepcopy(stock), keep_rate=0.5, blocks=[1, 2, 3], cluster_blocks=[1],
                      method="recording")
    got = vit_features(reuse, images)
    # One clustering for three reduced blocks: block 1's (a registered method takes one call per
    # K: full, edge and corner windows at 320 px).
    assert len(calls) == 3
    methods("replaying", replaying(calls * 3))
    per_block = apply_atc(copy.deepcopy(stock), keep_rate=0.5, blocks=[1, 2, 3], method="replaying")
    torch.testing.assert_close(got, vit_features(per_block, images), rtol=0, atol=0)
    clustered = vit_features(apply_atc(copy.deepcopy(stock), keep_rate=0.5, blocks=[1, 2, 3]), images)
    assert not torch.allclose(got, clustered)  # block 2 and 3 would have clustered otherwise


@pytest.mark.parametrize("kwargs, message", [
    (dict(cluster_blocks=[2]), r"including the first \(1\)"),
    (dict(cluster_blocks=[1, 5]), "indexes of the reduction blocks"),
    (dict(cluster_blocks=[1], scope="image"), "needs scope 'window'"),
    (dict(cluster_blocks=[1], mode="merge"), "needs mode 'dense'"),
    (dict(cluster_blocks="1"), "cluster_blocks"),
])
def test_bad_cluster_blocks_is_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_atc(small_vit(), keep_rate=0.5, blocks=[1, 2, 3], **kwargs)


def test_reduced_blocks_under_bf16_autocast(methods):
    """The merged-token path with nothing merged (threshold 0) under bf16 autocast equals stock
    under autocast within bf16 tolerance; at keep 0.5 the clustering still sees float32 features
    while attention and MLP run in bf16."""
    stock = apply_fast_attention(small_vit(img_size=320))
    images = torch.randn(1, 3, 320, 320)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = vit_features(stock, images)
        got = vit_features(apply_atc(copy.deepcopy(stock), threshold=0.0), images)
    reference = vit_features(stock, images)
    tolerance = (expected.float() - reference).abs().max().item()
    assert (got.float() - expected.float()).abs().max().item() <= 2 * tolerance + 1e-3
    seen = []

    def spy(metric, num_clusters, **options):
        seen.append(metric.dtype)
        return get_method("atc")(metric, num_clusters, **options)
    methods("spy", spy)
    model = apply_atc(copy.deepcopy(stock), keep_rate=0.5, method="spy")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vit_features(model, images)
    assert seen and set(seen) == {torch.float32}
    assert torch.isfinite(out.float()).all()
    linear_dtypes = []
    hook = model.blocks[1].mlp.fc1.register_forward_hook(lambda m, i, o: linear_dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vit_features(model, images)
    hook.remove()
    assert linear_dtypes == [torch.bfloat16]


def test_activation_checkpointing_gives_the_gradients_of_the_plain_model():
    """Blocks wrapped for activation checkpointing (torch's checkpoint_wrapper; Detectron2's
    use_act_checkpoint=True uses fairscale's, handled the same way): ATC applies inside the
    wrapper, and outputs and gradients equal those without checkpointing."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    plain = small_vit(img_size=320, drop_path_rate=0.0)
    wrapped = copy.deepcopy(plain)
    for index in range(len(wrapped.blocks)):
        wrapped.blocks[index] = checkpoint_wrapper(wrapped.blocks[index])
    images = torch.randn(2, 3, 320, 320)
    grads = []
    for model in (plain, wrapped):
        apply_atc(model, keep_rate=0.5, blocks=[1, 2, 3]).train()
        out = model(images)["last_feat"]
        out.square().mean().backward()
        grads.append((out.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad
                                     for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    assert grads[1][1].keys() == grads[0][1].keys()
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="activation checkpointing"):
        apply_atc(wrapped, keep_rate=0.5, blocks=[1, 2, 3], cluster_blocks=[1])
