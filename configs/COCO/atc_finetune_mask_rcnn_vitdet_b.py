# Fine-tuning ViTDet-B Mask R-CNN with ATC from the official COCO checkpoint: the ATC recipe
# (atc_mask_rcnn_vitdet_b_100ep.py) initialised with Detectron2's model_final_61ccd1.pkl, on a
# 0.5x schedule (50 epochs, milestones halved) at a tenth of the learning rate. The ATC authors
# fine-tuned their detectors on a short schedule at a low learning rate; these exact values are
# this project's choice, not theirs.
from .atc_mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

train.init_checkpoint = "detectron2://ViTDet/COCO/mask_rcnn_vitdet_b/f325346929/model_final_61ccd1.pkl"
train.max_iter = train.max_iter // 2
lr_multiplier.scheduler.milestones = [m // 2 for m in lr_multiplier.scheduler.milestones]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 250 / train.max_iter
optimizer.lr = optimizer.lr / 10
