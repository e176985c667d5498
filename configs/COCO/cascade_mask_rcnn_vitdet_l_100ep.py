# ViTDet-l Cascade Mask R-CNN on COCO (Detectron2's cascade_mask_rcnn_vitdet_l_100ep.py): the
# ViT-l Mask R-CNN recipe (mask_rcnn_vitdet_l_100ep.py) with the cascade box heads of
# cascade_mask_rcnn_vitdet_b_100ep.py.
from .cascade_mask_rcnn_vitdet_b_100ep import model as cascade
from .mask_rcnn_vitdet_l_100ep import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads = cascade.roi_heads
del cascade
