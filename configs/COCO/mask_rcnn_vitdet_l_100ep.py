# ViTDet-L Mask R-CNN on COCO, 100 epochs (Detectron2's mask_rcnn_vitdet_l_100ep.py: box AP 55.5,
# mask AP 49.2 there): ViT-L, global attention in blocks 5, 11, 17, 23.
from functools import partial

from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_large.pth?matching_heuristics=True"
)
net = model.backbone.net
net.embed_dim, net.depth, net.num_heads, net.drop_path_rate = 1024, 24, 16, 0.4
net.window_block_indexes = [i for i in range(24) if i % 6 != 5]
del net
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, lr_decay_rate=0.8, num_layers=24)
