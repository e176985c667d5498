"""The one entry point (atc_det.apply_atc / apply_sec and their removal) for Detectron2 and timm.

References: the frameworks' own unpatched modules (stock blocks run on each cluster's mean,
which is what attention over merged tokens with proportional attention must equal), SciPy's
hierarchy for the partitions, and a NumPy ranking for SEC groups.
"""
import copy
import functools

import numpy as np
import pytest
import torch
from detectron2.modeling.backbone.utils import get_abs_pos
from detectron2.modeling.backbone.vit import Attention as D2Attention
from detectron2.modeling.backbone.vit import Block as D2Block
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from timm.models.vision_transformer import VisionTransformer

import atc_det
from atc_det import registry
from atc_det.modeling import check_config, collect_source_maps
from conftest import make_cfg, small_vit, vit_features

# conftest's small ViTDet ViT with Detectron2's own rel-pos tables and no drop path.
d2_vit = functools.partial(small_vit, strong_rel_pos=False, drop_path_rate=0.0)


def tiny_timm() -> VisionTransformer:
    """A timm ViT with a class token and one register: 64 patch tokens at 32 x 32."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2,
                             num_classes=0, reg_tokens=1).eval()


MODELS = {"detectron2": (d2_vit, (2, 3, 224, 224)), "timm": (tiny_timm, (2, 3, 32, 32))}


def scipy_labels(features: torch.Tensor, num_clusters: int) -> np.ndarray:
    """Average-linkage cosine partition of [N, C] features into K clusters (SciPy)."""
    tree = linkage(pdist(features.double().numpy(), "cosine"), "average")
    labels = fcluster(tree, num_clusters, criterion="maxclust") - 1
    assert len(np.unique(labels)) == num_clusters
    return labels


def cluster_means(x: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    """Every token of x [N, C] replaced by the mean of its cluster."""
    labels = torch.from_numpy(labels)
    means = torch.stack([x[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
    return means[labels]


def head_mean_keys(attn, normed: torch.Tensor) -> torch.Tensor:
    """All keys of a fused qkv layer, averaged over heads (written out, not the shortcut)."""
    channels = normed.shape[-1]
    keys = normed @ attn.qkv.weight[channels:2 * channels].T + attn.qkv.bias[channels:2 * channels]
    return keys.reshape(*keys.shape[:-1], attn.num_heads, -1).mean(-2)


PATCHES = {  # name -> (apply with arguments, remove)
    "atc": (lambda model: atc_det.apply_atc(model, keep_rate=0.5, blocks=[1, 2]), atc_det.remove_atc),
    "sec": (lambda model: atc_det.apply_sec(model, global_groups=2), atc_det.remove_sec),
}


@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("framework", MODELS)
def test_apply_and_remove_restore_the_stock_model(framework, patch):
    build, shape = MODELS[framework]
    apply, remove = PATCHES[patch]
    model = build()
    images = torch.randn(shape)
    expected, names = vit_features(model, images), list(model.state_dict())
    classes = [(type(b), type(b.attn)) for b in model.blocks]
    windows = [getattr(b, "window_size", None) for b in model.blocks]
    assert apply(model) is model
    assert list(model.state_dict()) == names
    assert not torch.allclose(vit_features(model, images), expected, atol=1e-4)
    assert remove(model) is model
    assert [(type(b), type(b.attn)) for b in model.blocks] == classes
    assert [getattr(b, "window_size", None) for b in model.blocks] == windows
    if framework == "detectron2":
        assert all(type(b.attn) is D2Attention and type(b) is D2Block for b in model.blocks)
    torch.testing.assert_close(vit_features(model, images), expected, rtol=0, atol=0)


def test_timm_merge_mode_keeps_the_fraction_of_each_reductions_input():
    model = atc_det.apply_atc(tiny_timm(), keep_rate=[0.5, 0.25], blocks=[2, 1])
    vit_features(model, torch.randn(2, 3, 32, 32))
    size = model._atc_info["size"]
    # 64 patch tokens -> int(0.5 * 64) = 32 (block 1) -> int(0.25 * 32) = 8 (block 2)
    assert size.shape == (2, 2 + 8) and (size[:, :2] == 1).all() and (size[:, 2:].sum(1) == 64).all()


@pytest.mark.parametrize("keep_rate", [0.5, 0.3])
def test_detectron2_merge_mode_clusters_the_clusters(keep_rate):
    vit = atc_det.apply_atc(d2_vit(), keep_rate=keep_rate, blocks=[1, 3], mode="merge")
    assert [type(b).__name__ for b in vit.blocks] == ["Block", "ATCBlock", "ATCBlock", "ATCBlock"]
    maps = collect_source_maps(vit, torch.randn(2, 3, 224, 224))  # one full window per image
    first = int(keep_rate * 196)
    for image in range(2):
        counts = [len(maps[block][image].unique()) for block in (1, 2, 3)]
        assert counts == [first, first, int(keep_rate * first)]
        # Block 3's clusters are unions of block 1's (the partition only coarsens).
        fine, coarse = maps[1][image].flatten(), maps[3][image].flatten()
        assert all(len(coarse[fine == c].unique()) == 1 for c in fine.unique())


def test_detectron2_merge_mode_equals_stock_blocks_on_cluster_means():
    stock = d2_vit(use_rel_pos=False)
    vit = atc_det.apply_atc(copy.deepcopy(stock), keep_rate=0.5, blocks=[1], mode="merge")
    images = torch.randn(2, 3, 224, 224)  # 14 x 14 tokens: one window per image
    with torch.no_grad():
        x = stock.patch_embed(images)
        x = x + get_abs_pos(stock.pos_embed, stock.pretrain_use_cls_token, x.shape[1:3])
        x = stock.blocks[0](x)
        block = stock.blocks[1]
        keys = head_mean_keys(block.attn, block.norm1(x)).flatten(1, 2)
        tokens = x.flatten(1, 2)
        x = torch.stack([cluster_means(tokens[i], scipy_labels(keys[i], 98)) for i in range(2)])
        x = x.reshape(2, 14, 14, -1)
        for block in stock.blocks[1:]:
            x = block(x)
        expected = x.permute(0, 3, 1, 2)
    torch.testing.assert_close(vit_features(vit, images), expected, rtol=1e-4, atol=1e-4)


def test_timm_dense_mode_equals_stock_block_on_cluster_means():
    stock = tiny_timm()
    model = atc_det.apply_atc(copy.deepcopy(stock), keep_rate=0.5, blocks=[2], mode="dense")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = stock.norm_pre(stock._pos_embed(stock.patch_embed(images)))
        x = stock.blocks[1](stock.blocks[0](x))
        block = stock.blocks[2]
        keys = head_mean_keys(block.attn, block.norm1(x))
        means = []
        for i in range(2):  # prefix tokens (class, register) are singletons
            labels = np.concatenate([[0, 1], 2 + scipy_labels(keys[i, 2:], 32)])
            means.append(cluster_means(x[i], labels))
        means = torch.stack(means)
        x = x + block(means) - means  # each cluster's update, added to its members
        expected = stock.norm(stock.blocks[3](x))
    torch.testing.assert_close(model.forward_features(images), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["dense", "merge"])
def test_keep_rate_one_equals_stock_in_both_modes_and_frameworks(mode):
    for build, shape in MODELS.values():
        stock = build()
        images = torch.randn(shape)
        model = atc_det.apply_atc(copy.deepcopy(stock), keep_rate=1.0, blocks=[1, 2, 3], mode=mode)
        expected = vit_features(stock, images)
        torch.testing.assert_close(vit_features(model, images), expected, rtol=1e-4, atol=1e-5)


BAD_ARGUMENTS = [
    (dict(blocks=[1.7]), "blocks"),
    (dict(blocks=[True]), "blocks"),
    (dict(blocks=[]), "blocks"),
    (dict(blocks=[1, 1]), "blocks"),
    (dict(keep_rate=True), "keep_rate"),
    (dict(keep_rate=1.5), "keep_rate"),
    (dict(keep_rate=[0.5, 0.5, 0.5, 0.5, 0.5]), "keep_rate"),
    (dict(keep_rate="0.5"), "keep_rate"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(threshold=0.2, method="tome"), "threshold"),
    (dict(method="kmeans"), "'atc', 'tome', 'kmedoids', 'dpcknn', 'random'"),
    (dict(linkage="ward"), "linkage"),
    (dict(metric="values"), "metric"),
    (dict(mode="sparse"), "mode"),
]


@pytest.mark.parametrize("framework", MODELS)
@pytest.mark.parametrize("arguments, names", BAD_ARGUMENTS)
def test_one_validator_for_both_frameworks(framework, arguments, names):
    model = MODELS[framework][0]()
    classes = [type(b) for b in model.blocks]
    with pytest.raises(ValueError, match=names):
        atc_det.apply_atc(model, **arguments)
    assert [type(b) for b in model.blocks] == classes


def test_framework_options_are_rejected_where_they_do_not_apply():
    with pytest.raises(ValueError, match="rel_pos applies to Detectron2"):
        atc_det.apply_atc(tiny_timm(), rel_pos="mean")
    with pytest.raises(ValueError, match="real_area applies to Detectron2's ViT and SAM"):
        atc_det.apply_atc(tiny_timm(), real_area=True)
    with pytest.raises(ValueError, match="scope 'window' .* needs mode 'dense'"):
        atc_det.apply_atc(tiny_timm(), scope="window")
    with pytest.raises(ValueError, match="needs scope 'window'"):
        atc_det.apply_atc(d2_vit(), mode="merge", scope="image")
    with pytest.raises(ValueError, match="windowed"):
        atc_det.apply_sec(tiny_timm(), windowed=False)
    with pytest.raises(TypeError, match="Detectron2 ViT .* or a timm VisionTransformer"):
        atc_det.apply_atc(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("framework", MODELS)
def test_a_registered_method_works_in_every_adapter(framework, monkeypatch):
    monkeypatch.setattr(registry, "_registered", {})
    calls = []

    def counted(metric, num_clusters, **options):
        calls.append(num_clusters)
        return registry.get_method("kmedoids")(metric, num_clusters, **options)

    registry.register_method("counted", counted)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method("atc", counted)
    build, shape = MODELS[framework]
    model = atc_det.apply_atc(build(), keep_rate=0.5, blocks=[1], method="counted")
    vit_features(model, torch.randn(shape))
    assert calls and all(k > 1 for k in calls)


@pytest.mark.parametrize("framework", MODELS)
def test_atc_and_sec_do_not_combine_and_sec_applies_once(framework):
    model = MODELS[framework][0]()
    atc_det.apply_sec(model, global_groups=2)
    with pytest.raises(ValueError, match="already uses SEC"):
        atc_det.apply_sec(model, global_groups=2)
    with pytest.raises(ValueError, match="remove_sec"):
        atc_det.apply_atc(model, keep_rate=0.5)
    atc_det.remove_sec(model)
    atc_det.apply_atc(model, keep_rate=0.5)
    with pytest.raises(ValueError, match="remove_atc"):
        atc_det.apply_sec(model, global_groups=2)


def test_timm_sec_attention_equals_masked_attention_over_numpy_groups():
    model = tiny_timm()
    attn = model.blocks[1].attn
    x = torch.randn(2, 2 + 64, 32)
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(2, 66, 3, 2, 16).permute(2, 0, 3, 1, 4)
        allowed = torch.ones(2, 2, 66, 66, dtype=torch.bool)  # [B, heads, query, key]
        for b in range(2):
            for h in range(2):
                patch_keys = k[b, h, 2:].numpy()
                centre = patch_keys.mean(0) / np.linalg.norm(patch_keys.mean(0))
                cosine = patch_keys @ centre / np.linalg.norm(patch_keys, axis=1)
                group = np.empty(64, dtype=int)
                for g, members in enumerate(np.array_split(np.argsort(cosine, kind="stable"), 3)):
                    group[members] = g
                same = torch.from_numpy(group[:, None] == group[None, :])
                allowed[b, h, 2:, 2:] = same  # patch queries: own group + the prefix keys
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 66, 32))
        atc_det.apply_sec(model, blocks=[1], global_groups=3)
        torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keys, message", [
    (dict(SEC__ENABLED=True), "both True"),
    (dict(ATC__KEEP_RATE=[1.5]), r"MODEL\.ATC\.KEEP_RATE"),
    (dict(ATC__MODE="sparse"), r"MODEL\.ATC\.MODE"),
    (dict(ATC__BLOCKS=[12]), r"MODEL\.ATC\.BLOCKS"),
    (dict(ATC__PROP_ATTN="yes"), r"MODEL\.ATC\.PROP_ATTN"),
    (dict(ATC__ENABLED=False, SEC__ENABLED=True, SEC__GLOBAL_GROUPS=0), r"MODEL\.SEC\.GLOBAL_GROUPS"),
])
def test_check_config_names_the_key_without_building_a_model(keys, message):
    with pytest.raises(ValueError, match=message):
        check_config(make_cfg(**{"ATC__ENABLED": True, **keys}))
