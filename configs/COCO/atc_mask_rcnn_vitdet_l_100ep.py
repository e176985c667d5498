# mask_rcnn_vitdet_l_100ep.py + ATC: agglomerative token clustering (average linkage) per 14x14 window in every ViT
# block but the first, keeping half of each window's tokens, each block's update scattered back
# to the members (the rest of the detector sees the stock dense features). Off-the-shelf
# evaluation of the official checkpoint (README):
#   python tools/train_net.py --config-file configs/COCO/atc_mask_rcnn_vitdet_l_100ep.py --eval-only \
#       train.init_checkpoint=<model_final.pkl> model.backbone.net.atc.keep_rate=0.25
from atc_det.modeling.lazy import with_atc

from .mask_rcnn_vitdet_l_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net = with_atc(model.backbone.net, keep_rate=0.5, linkage="average")
