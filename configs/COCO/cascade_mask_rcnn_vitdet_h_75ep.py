# ViTDet-h Cascade Mask R-CNN on COCO (Detectron2's cascade_mask_rcnn_vitdet_h_75ep.py): the
# ViT-h Mask R-CNN recipe (mask_rcnn_vitdet_h_75ep.py) with the cascade box heads of
# cascade_mask_rcnn_vitdet_b_100ep.py.
from .cascade_mask_rcnn_vitdet_b_100ep import model as cascade
from .mask_rcnn_vitdet_h_75ep import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads = cascade.roi_heads
del cascade
