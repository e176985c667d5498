"""SEC grouping and SEC attention in Detectron2's ViT, against independent references:
Detectron2's own Attention / Block / add_decomposed_rel_pos and a brute-force per-group loop."""
import copy

import pytest
import torch
from detectron2.modeling import ViT
from detectron2.modeling.backbone.utils import add_decomposed_rel_pos
from detectron2.modeling.backbone.vit import Attention, Block

from atc_det.modeling import apply_fast_attention, remove_fast_attention
from atc_det.modeling.sec_attention import apply_sec, apply_sec_from_cfg, remove_sec
from atc_det.sdpa_peer import FastAttention
from atc_det.sec import balanced_slots, gather_groups, scatter_groups, sec_group_indices
from atc_det.vitdet_sec import SecAttention, swap_sec_attention
from conftest import make_cfg, reference_groups

torch.manual_seed(0)
DIM, HEADS = 32, 4


def reference_sec_attention(attn: Attention, x: torch.Tensor, num_groups: int, bias_fn):
    """Loop over images, heads and groups: softmax(q k^T * scale + bias) v within each group."""
    batch, height, width, _ = x.shape
    n = height * width
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    out = torch.zeros(batch, attn.num_heads, n, qkv.shape[-1])
    for b in range(batch):
        for h in range(attn.num_heads):
            q, k, v = qkv[0, b, h], qkv[1, b, h], qkv[2, b, h]
            bias = bias_fn(q) if attn.use_rel_pos else torch.zeros(n, n)
            for idx in reference_groups(k, num_groups):
                logits = (q[idx] * attn.scale) @ k[idx].T + bias[idx][:, idx]
                out[b, h, idx] = logits.softmax(-1) @ v[idx]
    return attn.proj(out.permute(0, 2, 1, 3).reshape(batch, height, width, -1))


def detectron2_bias(attn: Attention, height: int, width: int):
    """Full [N, N] rel-pos bias from Detectron2's add_decomposed_rel_pos (zero logits)."""

    def bias_fn(q):
        zeros = torch.zeros(1, height * width, height * width)
        hw = (height, width)
        return add_decomposed_rel_pos(zeros, q[None], attn.rel_pos_h, attn.rel_pos_w, hw, hw)[0]

    return bias_fn


def clamped_bias(attn: Attention, height: int, width: int):
    """Full [N, N] bias, offsets clamped to the table range, by a loop over token pairs."""

    def bias_fn(q):
        radius_h, radius_w = attn.rel_pos_h.shape[0] // 2, attn.rel_pos_w.shape[0] // 2
        n = height * width
        bias = torch.zeros(n, n)
        for i in range(n):
            for j in range(n):
                dy = max(-radius_h, min(radius_h, i // width - j // width))
                dx = max(-radius_w, min(radius_w, i % width - j % width))
                bias[i, j] = q[i] @ attn.rel_pos_h[dy + radius_h] + q[i] @ attn.rel_pos_w[dx + radius_w]
        return bias

    return bias_fn


def make_attention(input_size) -> Attention:
    return Attention(DIM, HEADS, use_rel_pos=True, rel_pos_zero_init=False, input_size=input_size)


def test_slots_are_balanced_and_cover_every_rank_once():
    for n, g in [(10, 4), (12, 3), (7, 7), (100, 9), (4096, 21)]:
        slots = balanced_slots(n, g)
        real = slots[slots < n]
        assert torch.equal(real, torch.arange(n))
        sizes = (slots < n).sum(1)
        assert sizes.max() - sizes.min() <= 1 and (sizes > 0).all()
    with pytest.raises(ValueError, match="num_groups"):
        balanced_slots(3, 4)


def test_grouping_matches_brute_force_ranking():
    keys = torch.randn(2, 3, 23, 8)
    perm = sec_group_indices(keys, 5)
    for b in range(2):
        for h in range(3):
            groups = [[t for t in row.tolist() if t < 23] for row in perm[b, h]]
            assert groups == reference_groups(keys[b, h], 5)


def test_gather_scatter_roundtrip_and_one_group_keeps_order():
    x = torch.randn(2, 3, 23, 8)
    perm = sec_group_indices(torch.randn(2, 3, 23, 4), 6)
    assert torch.equal(scatter_groups(gather_groups(x, perm), perm, 23), x)
    assert torch.equal(sec_group_indices(x, 1)[0, 0, 0], torch.arange(23))


def test_one_group_equals_detectron2_global_attention_block():
    block = Block(DIM, HEADS, use_rel_pos=True, rel_pos_zero_init=False, input_size=(6, 7))
    x = torch.randn(2, 6, 7, DIM)
    expected = block(x)
    swap_sec_attention(block.attn, num_groups=1)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_one_group_resizes_table_like_detectron2_at_another_size():
    attn = make_attention((6, 6))
    x = torch.randn(1, 9, 5, DIM)
    expected = attn(x)
    torch.testing.assert_close(swap_sec_attention(attn, num_groups=1)(x), expected, rtol=1e-5, atol=1e-5)


def test_window_sized_image_equals_detectron2_window_attention():
    block = Block(DIM, HEADS, use_rel_pos=True, rel_pos_zero_init=False, window_size=5)
    x = torch.randn(2, 5, 5, DIM)
    expected = block(x)
    swap_sec_attention(block.attn, group_size=25, rel_pos_mode="clamp")
    block.window_size = 0
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_groups, size", [(3, (6, 7)), (5, (4, 4))])
def test_groups_match_per_group_loop_with_detectron2_rel_pos(num_groups, size):
    attn = make_attention(size)
    x = torch.randn(2, *size, DIM)
    expected = reference_sec_attention(attn, x, num_groups, detectron2_bias(attn, *size))
    got = swap_sec_attention(attn, num_groups=num_groups)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_window_groups_with_clamped_rel_pos_match_loop():
    attn = make_attention((3, 3))  # tables for offsets -2..2 on a 7x6 image
    x = torch.randn(1, 7, 6, DIM)
    expected = reference_sec_attention(attn, x, 5, clamped_bias(attn, 7, 6))  # ceil(42 / 9)
    got = swap_sec_attention(attn, group_size=9, rel_pos_mode="clamp")(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def tiny_sec_vit() -> ViT:
    """A 64 px ViT with 8x8 tokens: windows of 4 in blocks 0 and 2, blocks 1 and 3 global (not
    seeded: each call is another draw)."""
    return ViT(
        img_size=64, patch_size=8, embed_dim=DIM, depth=4, num_heads=HEADS, window_size=4,
        window_block_indexes=[0, 2], use_rel_pos=True, rel_pos_zero_init=False,
    )


def test_apply_sec_keeps_parameters_and_loads_vitdet_weights():
    vit = tiny_sec_vit().eval()
    names = list(vit.state_dict())
    x = torch.randn(1, 3, 64, 64)
    before = vit(x)["last_feat"]
    apply_sec(vit, windowed=True, global_groups=2)
    assert all(type(b.attn).__bases__ == (SecAttention, Attention) for b in vit.blocks)
    assert [b.attn._sec_group_size for b in vit.blocks] == [16, 0, 16, 0]
    assert [b.attn._sec_num_groups for b in vit.blocks] == [0, 2, 0, 2]
    assert list(vit.state_dict()) == names
    other = tiny_sec_vit()  # other weights (another draw): loading them must reach SEC's modules
    vit.load_state_dict(other.state_dict(), strict=True)
    assert torch.equal(vit.blocks[1].attn.rel_pos_h, other.blocks[1].attn.rel_pos_h)
    assert torch.equal(vit.blocks[1].attn.qkv.weight, other.blocks[1].attn.qkv.weight)
    after = vit(x)["last_feat"]
    assert after.shape == before.shape and not torch.allclose(after, before)
    after.sum().backward()
    assert vit.blocks[0].attn.rel_pos_h.grad.abs().sum() > 0


def test_apply_sec_leaves_unselected_and_one_group_blocks():
    vit = apply_sec(tiny_sec_vit(), windowed=False, global_groups=1)
    assert all(type(b.attn) is Attention for b in vit.blocks)
    vit = apply_sec(tiny_sec_vit(), windowed=True, global_groups=3, blocks=[1, 2])
    assert [type(b.attn).__name__ for b in vit.blocks] == [
        "Attention", "SECAttention", "SECAttention", "Attention"
    ]
    assert [b.window_size for b in vit.blocks] == [4, 0, 0, 0]


def test_apply_sec_from_cfg_and_errors_name_the_key():
    vit = apply_sec_from_cfg(tiny_sec_vit(), make_cfg(SEC__GLOBAL_GROUPS=2, SEC__BLOCKS=[0, 1]))
    assert [type(b.attn).__name__ for b in vit.blocks[:3]] == ["SECAttention"] * 2 + ["Attention"]
    for keys, name in [
        ({"SEC__GLOBAL_GROUPS": 0}, "MODEL.SEC.GLOBAL_GROUPS"),
        ({"SEC__BLOCKS": [1, 4]}, "MODEL.SEC.BLOCKS"),
        ({"SEC__WINDOWED": 1}, "MODEL.SEC.WINDOWED"),
    ]:
        with pytest.raises(ValueError, match=name):
            apply_sec_from_cfg(tiny_sec_vit(), make_cfg(**keys))
    with pytest.raises(TypeError, match="ViT"):
        apply_sec(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_groups"):
        swap_sec_attention(make_attention((2, 2)), num_groups=5)(torch.randn(1, 2, 2, DIM))
    with pytest.raises(ValueError, match="exactly one"):
        swap_sec_attention(make_attention((2, 2)), num_groups=2, group_size=4)


def test_apply_sec_swaps_the_class_of_the_same_attention_and_remove_restores_it():
    vit = tiny_sec_vit().eval()
    stock = copy.deepcopy(vit)
    attentions = [b.attn for b in vit.blocks]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = stock(x)["last_feat"]
        apply_sec(vit, windowed=True, global_groups=2, blocks=[0, 1, 3])
        assert all(b.attn is a for b, a in zip(vit.blocks, attentions))  # same objects, new class
        assert all(issubclass(type(b.attn), Attention) for b in vit.blocks)
        assert [isinstance(b.attn, SecAttention) for b in vit.blocks] == [True, True, False, True]
        assert [b.window_size for b in vit.blocks] == [0, 0, 4, 0]
        assert "sec_group_size=16" in repr(vit.blocks[0].attn)
        remove_sec(vit)
        assert all(b.attn is a for b, a in zip(vit.blocks, attentions))
        assert all(type(b.attn) is Attention for b in vit.blocks)
        assert [b.window_size for b in vit.blocks] == [4, 0, 4, 0]
        assert not any(k.startswith("_sec") for b in vit.blocks for k in vars(b.attn))
        torch.testing.assert_close(vit(x)["last_feat"], expected, rtol=0, atol=0)


def test_sec_over_the_dense_peer_and_removal_in_either_order():
    vit = apply_sec(apply_fast_attention(tiny_sec_vit()), global_groups=2)
    assert all(isinstance(b.attn, FastAttention) and isinstance(b.attn, SecAttention) for b in vit.blocks)
    remove_fast_attention(vit)  # the SEC mixin stays, over Detectron2's Attention
    assert all(type(b.attn).__bases__ == (SecAttention, Attention) for b in vit.blocks)
    remove_sec(vit)
    assert all(type(b.attn) is Attention for b in vit.blocks)


def test_toy_config_with_sec_enabled_builds_and_runs():
    from detectron2.modeling import build_model

    import atc_det.modeling.backbone  # noqa: F401  (registers build_vitdet_backbone)

    cfg = make_cfg("toy_vitdet.yaml", SEC__ENABLED=True, SEC__GLOBAL_GROUPS=4, DEVICE="cpu")
    model = build_model(cfg).eval()
    vit = model.backbone.net
    assert all(isinstance(b.attn, SecAttention) for b in vit.blocks)
    model.roi_heads.box_predictor.test_score_thresh = 0.0
    image = torch.rand(3, 256, 256) * 255
    with torch.no_grad():
        out = model([{"image": image}])[0]["instances"]
        boxes = out.pred_boxes.tensor
        assert len(out) > 0 and torch.isfinite(boxes).all()
        assert (boxes >= 0).all() and (boxes <= 256).all()
        # The SEC groups are what the detector ran on: removing them changes the features.
        pixels = model.preprocess_image([{"image": image}]).tensor
        with_sec = model.backbone(pixels)["p2"]
        remove_sec(vit)
        assert not torch.allclose(model.backbone(pixels)["p2"], with_sec, atol=1e-4)
