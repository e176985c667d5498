"""The dense peer: Detectron2's ViT with SDPA attention equals Detectron2's own attention."""
import copy

import pytest
import torch

from atc_det.modeling import apply_atc, apply_fast_attention, remove_fast_attention
from atc_det.modeling.fast_attention import FastAttention
from conftest import small_vit, vit_features


@pytest.mark.parametrize("img_size", [224, 320])
def test_fast_attention_equals_detectron2_attention(img_size):
    """Windowed and global blocks, relative positions large enough to matter, padded windows."""
    stock = small_vit(img_size=img_size)
    fast = apply_fast_attention(copy.deepcopy(stock))
    assert all(isinstance(block.attn, FastAttention) for block in fast.blocks)
    images = torch.randn(2, 3, img_size, img_size)
    torch.testing.assert_close(vit_features(fast, images), vit_features(stock, images),
                               rtol=1e-5, atol=1e-5)
    assert fast.state_dict().keys() == stock.state_dict().keys()
    remove_fast_attention(fast)
    assert all(not isinstance(block.attn, FastAttention) for block in fast.blocks)


def test_fast_attention_under_bf16_autocast_is_close_to_stock():
    stock = small_vit()
    fast = apply_fast_attention(copy.deepcopy(stock))
    images = torch.randn(1, 3, 224, 224)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vit_features(fast, images)
    torch.testing.assert_close(got.float(), vit_features(stock, images), rtol=0.05, atol=0.1)


def test_atc_on_top_of_fast_attention_at_keep_one_equals_stock():
    stock = small_vit(img_size=320)
    model = apply_atc(apply_fast_attention(copy.deepcopy(stock)), keep_rate=1.0)
    images = torch.randn(1, 3, 320, 320)
    torch.testing.assert_close(vit_features(model, images), vit_features(stock, images),
                               rtol=1e-4, atol=1e-4)


def test_apply_fast_attention_rejects_a_non_vit():
    with pytest.raises(TypeError, match="apply_fast_attention needs a detectron2.modeling.ViT"):
        apply_fast_attention(torch.nn.Linear(2, 2))
