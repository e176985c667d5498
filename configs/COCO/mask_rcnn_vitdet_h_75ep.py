# ViTDet-H Mask R-CNN on COCO, 75 epochs (Detectron2's mask_rcnn_vitdet_h_75ep.py: box AP 56.7,
# mask AP 50.2 there): ViT-H (patch 16), global attention in blocks 7, 15, 23, 31, the schedule
# and its milestones at 3/4 of the 100-epoch one.
from functools import partial

from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_huge_p14to16.pth?matching_heuristics=True"
)
net = model.backbone.net
net.embed_dim, net.depth, net.num_heads, net.drop_path_rate = 1280, 32, 16, 0.5
net.window_block_indexes = [i for i in range(32) if i % 8 != 7]
del net
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, lr_decay_rate=0.9, num_layers=32)
optimizer.params.overrides = {}
optimizer.params.weight_decay_norm = None

train.max_iter = train.max_iter * 3 // 4
lr_multiplier.scheduler.milestones = [m * 3 // 4 for m in lr_multiplier.scheduler.milestones]
lr_multiplier.scheduler.num_updates = train.max_iter
