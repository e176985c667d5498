"""ATC inside Detectron2's ViT, checked against Detectron2's own (unpatched) ViT."""
import copy

import pytest
import torch
from detectron2.modeling import build_model

from atc_det.engine import Checkpointer
from atc_det.modeling import apply_atc, apply_atc_from_cfg, collect_source_maps
from atc_det.registry import method_names
from conftest import make_cfg, small_vit, tiny_vitdet_pair, vit_features, write_model_zoo_pkl

SHAPES = [(2, 224, 224), (2, 200, 312), (1, 96, 96), (1, 16, 48)]
# MODEL.ATC keys of every config here unless a test gives others.
ATC_ON = dict(ATC__ENABLED=True, ATC__BLOCKS=[1, 2, 3])


@pytest.mark.parametrize("scope,rel_pos", [("window", "centroid"), ("image", "mean")])
@pytest.mark.parametrize("batch,height,width", SHAPES)
def test_keep_rate_one_equals_detectron2(batch, height, width, scope, rel_pos):
    stock = small_vit(residual_block_indexes=[1])
    patched = apply_atc(copy.deepcopy(stock), keep_rate=1.0, blocks=range(4), scope=scope, rel_pos=rel_pos)
    images = torch.randn(batch, 3, height, width)
    expected = vit_features(stock, images)
    torch.testing.assert_close(vit_features(patched, images), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scope", ["window", "image"])
@pytest.mark.parametrize("rel_pos", ["centroid", "mean"])
def test_zero_threshold_clusters_nothing_and_equals_detectron2(rel_pos, scope):
    # Distance threshold 0 keeps distinct tokens apart, so the merged-token path must reproduce
    # the stock model (labels come from the clustering call; keep rate 1 runs the stock block).
    # At 224 px there is no window padding (whose identical tokens would merge).
    stock = small_vit()
    patched = apply_atc(copy.deepcopy(stock), blocks=range(4), threshold=0.0, rel_pos=rel_pos, scope=scope)
    images = torch.randn(2, 3, 224, 224)
    expected = vit_features(stock, images)
    torch.testing.assert_close(vit_features(patched, images), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rel_pos", ["centroid", "mean"])
def test_query_chunks_of_the_rel_pos_mask_equal_detectron2(rel_pos, monkeypatch):
    # Attention rows whose mask exceeds MASK_CHUNK_BYTES take their queries in chunks: here
    # 5 rows per chunk of 196 (the last chunk 1 row), with every token its own cluster.
    from atc_det import vitdet_block

    bytes_per_row = 2 * 4 * 196 * 4  # images x heads x keys x float32
    monkeypatch.setattr(vitdet_block, "MASK_CHUNK_BYTES", 5 * bytes_per_row + 1)
    stock = small_vit()
    patched = apply_atc(copy.deepcopy(stock), blocks=range(4), threshold=0.0, rel_pos=rel_pos, scope="image")
    images = torch.randn(2, 3, 224, 224)
    expected = vit_features(stock, images)
    torch.testing.assert_close(vit_features(patched, images), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
def test_merging_duplicate_tokens_is_exact_with_proportional_attention(linkage):
    # Without positional embeddings, repeated patch columns give duplicate tokens in every block
    # of the stock model. Keeping exactly the distinct tokens must merge the duplicates, and
    # proportional attention (log cluster size) must then reproduce the stock output.
    stock = small_vit(use_rel_pos=False, use_abs_pos=False)
    columns = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8])  # 9 distinct of 14
    keep = 9 / 14
    patched = apply_atc(copy.deepcopy(stock), keep_rate=keep, linkage=linkage, blocks=range(4))
    torch.manual_seed(1)
    distinct = torch.randn(2, 3, 224, 9, 16)
    images = distinct[:, :, :, columns].reshape(2, 3, 224, 224)
    expected = vit_features(stock, images)
    torch.testing.assert_close(vit_features(patched, images), expected, rtol=1e-4, atol=1e-4)
    no_prop = apply_atc(copy.deepcopy(stock), keep_rate=keep, blocks=range(4), prop_attn=False)
    assert not torch.allclose(vit_features(no_prop, images), expected, atol=1e-3)


@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
@pytest.mark.parametrize("batch,height,width", SHAPES)
def test_reduced_model_keeps_stock_shapes(batch, height, width, linkage):
    stock = small_vit()
    patched = apply_atc(copy.deepcopy(stock), keep_rate=0.5, linkage=linkage, blocks=[1, 2, 3])
    images = torch.randn(batch, 3, height, width)
    out, expected = vit_features(patched, images), vit_features(stock, images)
    assert out.shape == expected.shape
    assert torch.isfinite(out).all()
    if height * width > 96 * 96:  # smaller images have fewer real tokens than clusters
        assert not torch.allclose(out, expected, atol=1e-4)


@pytest.mark.parametrize("method", sorted(set(method_names()) - {"random"}))
@pytest.mark.parametrize("scope,metric", [("window", "keys"), ("image", "input")])
def test_every_method_scope_and_metric_runs(method, scope, metric):
    patched = apply_atc(small_vit(), keep_rate=0.25, method=method, scope=scope, metric=metric)
    out = vit_features(patched, torch.randn(2, 3, 200, 312))
    assert out.shape == (2, 64, 12, 19) and torch.isfinite(out).all()


def test_rel_pos_modes_differ_only_for_merged_tokens():
    stock = small_vit()
    images = torch.randn(1, 3, 200, 312)
    centroid, mean = (
        vit_features(apply_atc(copy.deepcopy(stock), keep_rate=0.5, rel_pos=mode), images)
        for mode in ("centroid", "mean")
    )
    assert torch.isfinite(mean).all() and not torch.allclose(centroid, mean, atol=1e-4)
    with pytest.raises(ValueError, match="rel_pos"):
        apply_atc(copy.deepcopy(stock), rel_pos="nearest")


@pytest.mark.parametrize("rel_pos", ["centroid", "mean"])
def test_gradients_reach_every_parameter(rel_pos):
    vit = apply_atc(small_vit(), keep_rate=[0.5, 0.25, 0.75], blocks=[1, 2, 3], rel_pos=rel_pos).train()
    vit(torch.randn(2, 3, 200, 312))["last_feat"].square().mean().backward()
    for name, param in vit.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_parameter_names_and_checkpoint_unchanged():
    stock = small_vit()
    patched = apply_atc(copy.deepcopy(small_vit()), keep_rate=1.0, blocks=range(4))
    with torch.no_grad():
        for param in patched.parameters():
            param.add_(1.0)
    assert list(patched.state_dict()) == list(stock.state_dict())
    patched.load_state_dict(stock.state_dict(), strict=True)  # raises on missing / unexpected keys
    # The patched blocks compute with the loaded weights: at keep 1.0 they equal the stock model.
    images = torch.randn(1, 3, 224, 224)
    expected = vit_features(stock, images)
    torch.testing.assert_close(vit_features(patched, images), expected, rtol=1e-4, atol=1e-5)


def test_source_maps_give_a_cluster_per_patch():
    patched = apply_atc(small_vit(), keep_rate=0.5, blocks=[1, 2])
    maps = collect_source_maps(patched, torch.randn(2, 3, 224, 224))
    assert sorted(maps) == [1, 2]
    for source in maps.values():
        assert source.shape == (2, 14, 14) and source.dtype == torch.long
        for image in source:  # one 14x14 window: 98 clusters
            assert image.unique().numel() == 98
    assert all(b._atc_source_map is None for b in patched.blocks[1:3])


def test_apply_atc_from_cfg_uses_the_keys():
    cfg = make_cfg(**{**ATC_ON, "ATC__KEEP_RATE": [0.75, 0.5], "ATC__BLOCKS": [2, 3],
                      "ATC__METHOD": "tome", "ATC__SCOPE": "image", "ATC__REL_POS": "mean",
                      "ATC__REAL_AREA": True})
    vit = apply_atc_from_cfg(small_vit(), cfg)
    assert [type(b).__name__ for b in vit.blocks] == ["Block", "Block", "ATCBlock", "ATCBlock"]
    assert [b._atc.keep_rate for b in vit.blocks[2:]] == [0.75, 0.5]
    settings = {(b._atc.method, b._atc.scope, b._atc.rel_pos, b._atc.real_area) for b in vit.blocks[2:]}
    assert settings == {("tome", "image", "mean", True)}
    assert type(vit.patch_embed).__name__ == "RealAreaPatchEmbed"


@pytest.mark.parametrize(
    "keys,message",
    [
        (dict(ATC__KEEP_RATE=[0.0]), "MODEL.ATC.KEEP_RATE"),
        (dict(ATC__KEEP_RATE=[1.5]), "MODEL.ATC.KEEP_RATE"),
        (dict(ATC__KEEP_RATE=[0.5, 0.5]), "MODEL.ATC.KEEP_RATE"),
        (dict(ATC__LINKAGE="ward"), "MODEL.ATC.LINKAGE"),
        (dict(ATC__METHOD="kmeans"), "MODEL.ATC.METHOD"),
        (dict(ATC__METRIC="values"), "MODEL.ATC.METRIC"),
        (dict(ATC__SCOPE="batch"), "MODEL.ATC.SCOPE"),
        (dict(ATC__REL_POS="nearest"), "MODEL.ATC.REL_POS"),
        (dict(ATC__BLOCKS=[4]), "MODEL.ATC.BLOCKS"),
        (dict(ATC__METHOD="tome", ATC__THRESHOLD=0.5), "MODEL.ATC.THRESHOLD"),
        (dict(ATC__REAL_AREA=True, ATC__MODE="merge"), "MODEL.ATC.REAL_AREA"),
    ],
)
def test_bad_settings_raise_one_clear_error(keys, message):
    with pytest.raises(ValueError, match=message):
        apply_atc_from_cfg(small_vit(), make_cfg(**{**ATC_ON, **keys}))


def test_apply_atc_rejects_other_modules():
    with pytest.raises(TypeError, match="detectron2.modeling.ViT"):
        apply_atc(torch.nn.Linear(2, 2), keep_rate=0.5)


def test_official_checkpoint_in_atc_model_equals_detectron2_lazyconfig_vitdet(tmp_path):
    """configs/atc_vitdet_b.yaml (shrunk) loads an official-format .pkl of Detectron2's own
    LazyConfig ViTDet with no missing or unexpected keys; at keep rate 1.0 its backbone gives
    Detectron2's features, and at 0.5 the whole detector runs."""
    theirs, _, cfg = tiny_vitdet_pair("atc_vitdet_b.yaml")
    path = str(tmp_path / "model_final.pkl")
    write_model_zoo_pkl(path, theirs.state_dict())
    images = torch.randn(1, 3, 320, 320)
    for keep in (1.0, 0.5):
        cfg.defrost()
        cfg.MODEL.ATC.KEEP_RATE = [keep]
        model = build_model(cfg).eval()
        assert type(model.backbone.net.blocks[1]).__name__ == "ATCBlock"
        Checkpointer(model, strict=True).load(path)  # raises on any key mismatch
        with torch.no_grad():
            if keep == 1.0:
                expected, out = theirs.backbone(images), model.backbone(images)
                for level in expected:
                    torch.testing.assert_close(out[level], expected[level], rtol=1e-4, atol=1e-4)
            else:
                image = torch.randint(0, 255, (3, 200, 296)).float()
                result = model([{"image": image, "height": 200, "width": 296}])[0]["instances"]
                assert len(result) > 0 and torch.isfinite(result.pred_boxes.tensor).all()
