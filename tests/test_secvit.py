"""SecViT backbone: sizes vs the paper, attention vs independent references, Detectron2 build."""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from fvcore.nn import FlopCountAnalysis

from atc_det.modeling.secvit_backbone import (
    SECVIT_PAPER,
    SECVIT_VARIANTS,
    SecAttention2d,
    SecViT,
    build_secvit,
    rotary_tables,
    secvit_classifier,
)
from conftest import make_cfg, reference_groups

torch.manual_seed(0)


def flops(model, size=224):
    """fvcore FLOPs (one multiply-add = 1) by operator, model in eval mode."""
    count = FlopCountAnalysis(model.eval(), torch.randn(1, 3, size, size))
    count.unsupported_ops_warnings(False)
    count.uncalled_modules_warnings(False)
    return count.by_operator()


def attention_flops(variant, size=224):
    """q k^T and attn v products: 2 * N * group * C per block (group 98, global in stage 4)."""
    spec = SECVIT_VARIANTS[variant]
    total = 0
    for stage, (dim, depth) in enumerate(zip(spec["embed_dims"], spec["depths"])):
        tokens = (size // 2 ** (stage + 2)) ** 2
        group = tokens if stage == 3 else tokens // math.ceil(tokens / 98)
        total += depth * 2 * tokens * group * dim
    return total


@pytest.mark.parametrize("variant", ["T", "S", "B", "L"])
def test_params_and_flops_within_3_percent_of_paper(variant):
    model = secvit_classifier(variant)
    paper_params, paper_flops = SECVIT_PAPER[variant]
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / paper_params - 1) < 0.03
    by_op = flops(model)
    assert by_op["matmul"] == attention_flops(variant)
    # The paper's FLOPs leave out the attention products (see docs/sec.md).
    without_attention = sum(by_op.values()) - by_op["matmul"]
    assert abs(without_attention / paper_flops - 1) < 0.03


def complex_rotary(x, height, width):
    """Reference 2-D RoPE with complex numbers: first half of the pairs turn with the row, the
    second half with the column, frequencies 10000 ** -linspace(0, 1, d / 4)."""
    pairs = x.shape[-1] // 2
    freqs = 10000.0 ** -torch.linspace(0, 1, pairs // 2)
    rows = torch.arange(height).repeat_interleave(width)[:, None].float()
    cols = torch.arange(width).repeat(height)[:, None].float()
    angles = torch.cat([rows * freqs, cols * freqs], dim=-1)  # [N, d / 2]
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], pairs, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def reference_attention(attn: SecAttention2d, x, num_groups):
    """Per-group torch SDPA on complex-RoPE q / k, plus LePE and the output projection."""
    batch, dim, height, width = x.shape
    qkv = attn.qkv(x)
    q, k, v = qkv.reshape(batch, 3, attn.num_heads, -1, height * width).transpose(-2, -1).unbind(1)
    q, k = complex_rotary(q, height, width), complex_rotary(k, height, width)
    out = torch.zeros_like(v)
    for b in range(batch):
        for h in range(attn.num_heads):
            for idx in reference_groups(k[b, h], num_groups):
                out[b, h, idx] = F.scaled_dot_product_attention(q[b, h, idx], k[b, h, idx], v[b, h, idx])
    out = out.transpose(-2, -1).reshape(batch, dim, height, width)
    return attn.out_proj(out + attn.lepe(qkv[:, 2 * dim:]))


@pytest.mark.parametrize("group_size, num_groups", [(0, 1), (20, 4), (98, 1)])
def test_sec_attention_matches_per_group_sdpa(group_size, num_groups):
    attn = SecAttention2d(32, 2, group_size)
    x = torch.randn(2, 32, 7, 10)
    with torch.no_grad():
        expected = reference_attention(attn, x, num_groups)
        got = attn(x, *rotary_tables(7, 10, 16))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["t", "s", "b", "l"])
def test_config_files_build_the_paper_variants(variant):
    cfg = make_cfg(f"secvit_{variant}_mask_rcnn.yaml", DEVICE="cpu")
    body = build_secvit(cfg, ShapeSpec(channels=3))
    classifier_body = secvit_classifier(variant.upper()).body
    out_norm_params = sum(p.numel() for p in body.out_norms.parameters())
    assert sum(p.numel() for p in body.parameters()) - out_norm_params == sum(
        p.numel() for p in classifier_body.parameters()
    )


def test_fpn_backbone_outputs_p2_to_p6():
    cfg = make_cfg("secvit_t_mask_rcnn.yaml", DEVICE="cpu")
    backbone = build_backbone(cfg).eval()
    shapes = backbone.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 160, 224))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "p2": (40, 56), "p3": (20, 28), "p4": (10, 14), "p5": (5, 7), "p6": (3, 4)
    }


def test_mask_rcnn_trains_and_infers():
    cfg = make_cfg("secvit_t_mask_rcnn.yaml", DEVICE="cpu")
    cfg.MODEL.SECVIT.DEPTHS = [1, 1, 1, 1]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    model = build_model(cfg)

    image = torch.randint(0, 255, (3, 128, 160)).float()
    targets = Instances((128, 160))
    targets.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 60.0, 90.0]]))
    targets.gt_classes = torch.tensor([1])
    mask = torch.zeros(1, 128, 160, dtype=torch.bool)
    mask[:, 20:90, 10:60] = True
    targets.gt_masks = BitMasks(mask)
    with EventStorage():
        losses = model([{"image": image, "instances": targets}])
    sum(losses.values()).backward()
    assert model.backbone.bottom_up.stages[0][0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.test_score_thresh = 0.0
        result = model([{"image": image, "height": 128, "width": 160}])[0]["instances"]
    boxes = result.pred_boxes.tensor
    assert len(result) > 0 and torch.isfinite(boxes).all()
    assert (boxes[:, 0::2] <= 160).all() and (boxes[:, 1::2] <= 128).all() and (boxes >= 0).all()


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="variant"):
        secvit_classifier("XL")
    with pytest.raises(ValueError, match="embed_dims"):
        secvit_classifier("T", embed_dims=(64, 128, 256))
    with pytest.raises(ValueError, match="out_features"):
        SecViT(out_features=("res6",))
    cfg = get_cfg()
    with pytest.raises(ValueError, match="add_secvit_config"):
        build_secvit(cfg, ShapeSpec(channels=3))
