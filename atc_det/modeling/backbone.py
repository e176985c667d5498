"""ViTDet backbone (Detectron2's own ViT + SimpleFeaturePyramid) built from yacs keys."""
from functools import partial

import torch.nn as nn
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, SimpleFeaturePyramid, ViT
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from atc_det.vitdet_block import check_atc_arguments

from .atc_vit import apply_atc_from_cfg, atc_arguments_from_cfg
from .sec_attention import apply_sec_from_cfg, sec_arguments_from_cfg


def build_vit(cfg: CfgNode, in_chans: int = 3) -> ViT:
    """Detectron2's ``ViT`` from ``MODEL.VIT.*``; ATC / SEC patched in when enabled."""
    v = cfg.MODEL.VIT
    vit = ViT(
        img_size=v.IMG_SIZE,
        patch_size=v.PATCH_SIZE,
        in_chans=in_chans,
        embed_dim=v.EMBED_DIM,
        depth=v.DEPTH,
        num_heads=v.NUM_HEADS,
        mlp_ratio=v.MLP_RATIO,
        qkv_bias=v.QKV_BIAS,
        drop_path_rate=v.DROP_PATH_RATE,
        norm_layer=partial(nn.LayerNorm, eps=v.NORM_EPS),
        use_abs_pos=v.USE_ABS_POS,
        use_rel_pos=v.USE_REL_POS,
        rel_pos_zero_init=v.REL_POS_ZERO_INIT,
        window_size=v.WINDOW_SIZE,
        window_block_indexes=list(v.WINDOW_BLOCK_INDEXES),
        residual_block_indexes=list(v.RESIDUAL_BLOCK_INDEXES),
        use_act_checkpoint=v.USE_ACT_CHECKPOINT,
        pretrain_img_size=v.PRETRAIN_IMG_SIZE,
        pretrain_use_cls_token=v.PRETRAIN_USE_CLS_TOKEN,
        out_feature=v.OUT_FEATURE,
    )
    check_config(cfg)
    if cfg.MODEL.ATC.ENABLED:
        apply_atc_from_cfg(vit, cfg)
    if cfg.MODEL.SEC.ENABLED:
        apply_sec_from_cfg(vit, cfg)
    return vit


def check_config(cfg: CfgNode) -> None:
    """Raise one ValueError naming the key for bad ``MODEL.ATC.*`` / ``MODEL.SEC.*`` values,
    without building a model (``tools/train_net.py`` calls it before starting workers)."""
    if cfg.MODEL.ATC.ENABLED and cfg.MODEL.SEC.ENABLED:
        raise ValueError("MODEL.ATC.ENABLED and MODEL.SEC.ENABLED are both True: enable one of them")
    depth = cfg.MODEL.VIT.DEPTH
    if cfg.MODEL.ATC.ENABLED:
        check_atc_arguments(depth, **atc_arguments_from_cfg(cfg))
    if cfg.MODEL.SEC.ENABLED:
        sec_arguments_from_cfg(cfg, depth)


@BACKBONE_REGISTRY.register()
def build_vitdet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> SimpleFeaturePyramid:
    """ViTDet: ViT + SimpleFeaturePyramid with outputs p2..p6 (strides 4..64)."""
    vit = build_vit(cfg, in_chans=input_shape.channels)
    return SimpleFeaturePyramid(
        net=vit,
        in_feature=cfg.MODEL.VIT.OUT_FEATURE,
        out_channels=cfg.MODEL.SFP.OUT_CHANNELS,
        scale_factors=tuple(cfg.MODEL.SFP.SCALE_FACTORS),
        top_block=LastLevelMaxPool(),
        norm=cfg.MODEL.SFP.NORM,
        square_pad=cfg.MODEL.SFP.SQUARE_PAD,
    )
