# Fine-tuning ViTDet-B Cascade Mask R-CNN with ATC from the official COCO checkpoint
# (model_final_435fa9.pkl): the schedule of atc_finetune_mask_rcnn_vitdet_b.py.
from .atc_cascade_mask_rcnn_vitdet_b_100ep import model
from .atc_finetune_mask_rcnn_vitdet_b import dataloader, lr_multiplier, optimizer, train

train.init_checkpoint = "detectron2://ViTDet/COCO/cascade_mask_rcnn_vitdet_b/f325358525/model_final_435fa9.pkl"
