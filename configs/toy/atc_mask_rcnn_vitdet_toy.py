# The toy ViTDet (mask_rcnn_vitdet_toy.py) with ATC: average linkage, half of each window's
# tokens kept in every block but the first.
from atc_det.modeling.lazy import with_atc

from .mask_rcnn_vitdet_toy import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net = with_atc(model.backbone.net, keep_rate=0.5, linkage="average")
train.output_dir = "output/atc_toy_vitdet_lazy"
