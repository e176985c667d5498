# The embedded default as a LazyConfig: the tiny ViTDet Mask R-CNN of toy_vitdet.yaml (ViT with
# 192 channels, 8 blocks, 3 heads, windows of 8 at 256 px; a 64-channel pyramid, a 2-fc box head
# and a 2-conv mask head) on the
# synthetic toy shapes dataset (generated on first use), trained on the CPU. Same model, data
# and schedule as the yacs file; Detectron2's LazyConfig trainer has no gradient clipping, so it
# trains without the yacs file's clipping at norm 1.
#   python tools/train_net.py --config-file configs/toy/mask_rcnn_vitdet_toy.py
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
model.backbone.net.update(img_size=256, pretrain_img_size=256, embed_dim=192, depth=8, num_heads=3,
                          drop_path_rate=0.0, window_size=8,
                          window_block_indexes=[0, 1, 2, 4, 5, 6])
model.backbone.update(out_channels=64, square_pad=256)
model.proposal_generator.head.in_channels = 64
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
model.proposal_generator.update(batch_size_per_image=128, pre_nms_topk=(1000, 500),
                                post_nms_topk=(300, 200))
model.roi_heads.update(num_classes=4, batch_size_per_image=128)
model.roi_heads.box_head.update(input_shape=ShapeSpec(channels=64, height=7, width=7),
                                conv_dims=[], fc_dims=[256, 256])
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
model.roi_heads.mask_head.update(input_shape=ShapeSpec(channels=64, width=14, height=14),
                                 conv_dims=[64] * 3)

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = "toy_shapes_train"
dataloader.train.mapper.update(
    augmentations=[L(T.ResizeShortestEdge)(short_edge_length=(256,), max_size=256, sample_style="choice"),
                   L(T.RandomFlip)(horizontal=True)],
    image_format="RGB", instance_mask_format="bitmask")
dataloader.train.update(total_batch_size=4, num_workers=1)
dataloader.test.dataset.names = "toy_shapes_val"
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=256, max_size=256)]
dataloader.test.num_workers = 1

train = model_zoo.get_config("common/train.py").train
train.update(output_dir="output/toy_vitdet_lazy", max_iter=1100, eval_period=0, seed=0)
train.checkpointer.period = 500

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[900, 1040], num_updates=train.max_iter
    ),
    warmup_length=50 / train.max_iter,
    warmup_factor=0.001,
)

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.update(lr=4e-4, weight_decay=0.05)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
