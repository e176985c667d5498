# ViTDet-B Cascade Mask R-CNN on COCO, 100 epochs (Detectron2's
# cascade_mask_rcnn_vitdet_b_100ep.py: box AP 54.0, mask AP 46.7 there): the Mask R-CNN recipe
# with three class-agnostic box stages (IoU 0.5 / 0.6 / 0.7), each a 4conv1fc head with LN.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

from .mask_rcnn_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

STAGES = [(0.5, (10, 10, 5, 5)), (0.6, (20, 20, 10, 10)), (0.7, (30, 30, 15, 15))]

for name in ("box_head", "box_predictor", "proposal_matcher"):  # single-stage arguments
    model.roi_heads.pop(name)
model.roi_heads.update(
    _target_=CascadeROIHeads,
    box_heads=[
        L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=256, height=7, width=7),
            conv_dims=[256] * 4,
            fc_dims=[1024],
            conv_norm="LN",
        )
        for _ in STAGES
    ],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=weights),
            cls_agnostic_bbox_reg=True,
            num_classes="${...num_classes}",
        )
        for _, weights in STAGES
    ],
    proposal_matchers=[
        L(Matcher)(thresholds=[iou], labels=[0, 1], allow_low_quality_matches=False)
        for iou, _ in STAGES
    ],
)
