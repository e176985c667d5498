"""Detectron2 (yacs) config keys for ViTDet, ATC and SEC.

``add_atc_det_config(cfg)`` adds every key below and the SecViT keys
(``atc_det.modeling.secvit_backbone.add_secvit_config``); it is what ``tools/train_net.py`` calls.
"""
from detectron2.config import CfgNode as CN


def add_vitdet_config(cfg: CN) -> None:
    """ViTDet backbone (ViT + SimpleFeaturePyramid) and its optimiser keys."""
    cfg.MODEL.VIT = CN()
    cfg.MODEL.VIT.IMG_SIZE = 1024
    cfg.MODEL.VIT.PATCH_SIZE = 16
    cfg.MODEL.VIT.EMBED_DIM = 768
    cfg.MODEL.VIT.DEPTH = 12
    cfg.MODEL.VIT.NUM_HEADS = 12
    cfg.MODEL.VIT.MLP_RATIO = 4.0
    cfg.MODEL.VIT.QKV_BIAS = True
    cfg.MODEL.VIT.DROP_PATH_RATE = 0.1
    cfg.MODEL.VIT.NORM_EPS = 1e-6
    cfg.MODEL.VIT.USE_ABS_POS = True
    cfg.MODEL.VIT.USE_REL_POS = True
    cfg.MODEL.VIT.REL_POS_ZERO_INIT = True
    cfg.MODEL.VIT.WINDOW_SIZE = 14
    # Blocks 2, 5, 8, 11 use global attention in ViTDet-B.
    cfg.MODEL.VIT.WINDOW_BLOCK_INDEXES = [0, 1, 3, 4, 6, 7, 9, 10]
    cfg.MODEL.VIT.RESIDUAL_BLOCK_INDEXES = []
    cfg.MODEL.VIT.USE_ACT_CHECKPOINT = False
    cfg.MODEL.VIT.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.VIT.PRETRAIN_USE_CLS_TOKEN = True
    cfg.MODEL.VIT.OUT_FEATURE = "last_feat"

    cfg.MODEL.SFP = CN()
    cfg.MODEL.SFP.OUT_CHANNELS = 256
    cfg.MODEL.SFP.SCALE_FACTORS = [4.0, 2.0, 1.0, 0.5]
    cfg.MODEL.SFP.NORM = "LN"
    # Inputs are padded to this square size (0: only to the backbone's size divisibility).
    cfg.MODEL.SFP.SQUARE_PAD = 1024
    # Loading MODEL.WEIGHTS fails on missing, unexpected or mis-shaped keys (except for weights
    # loaded with "?matching_heuristics=True", e.g. an ImageNet-pretrained backbone).
    cfg.MODEL.WEIGHTS_STRICT = True

    # Layer-wise learning-rate decay of ViT parameters (1.0: none), as in ViTDet.
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.LR_DECAY_RATE = 1.0
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # Large-scale jitter (LSJ) augmentation: random scale of the square image size, then crop/pad.
    cfg.INPUT.LSJ = CN()
    cfg.INPUT.LSJ.ENABLED = False
    cfg.INPUT.LSJ.IMAGE_SIZE = 1024
    cfg.INPUT.LSJ.MIN_SCALE = 0.1
    cfg.INPUT.LSJ.MAX_SCALE = 2.0


def add_atc_config(cfg: CN) -> None:
    """Token clustering inside ViTDet blocks (``MODEL.ATC.*``)."""
    cfg.MODEL.ATC = CN()
    cfg.MODEL.ATC.ENABLED = False
    # "atc" (agglomerative), or the baselines "tome", "kmedoids", "dpcknn".
    cfg.MODEL.ATC.METHOD = "atc"
    # "single", "complete" or "average" (ATC only).
    cfg.MODEL.ATC.LINKAGE = "average"
    # Fraction of a reduction's input tokens KEPT (as int(KEEP_RATE * T) clusters), in (0, 1]:
    # one value for all BLOCKS, or one value per entry of BLOCKS.
    cfg.MODEL.ATC.KEEP_RATE = [0.5]
    # Indexes of the ViT blocks that cluster their tokens; empty: every block but the first.
    cfg.MODEL.ATC.BLOCKS = []
    # Features clustered: "keys" (attention keys of the block's own input) or "input" (normed input).
    cfg.MODEL.ATC.METRIC = "keys"
    # Add log(cluster size) to the attention logits (proportional attention).
    cfg.MODEL.ATC.PROP_ATTN = True
    # "dense": each reduced block scatters its update back to the members (the ViTDet setting);
    # "merge": tokens stay merged from the first reduction block on (needs SCOPE "window").
    cfg.MODEL.ATC.MODE = "dense"
    # "window": cluster each 14x14 window with the same K (batched); "image": cluster the image.
    cfg.MODEL.ATC.SCOPE = "window"
    # Relative positions of a merged token: "centroid" (tables interpolated at the size-weighted
    # centroid) or "mean" (exact mean over member pairs); see docs/atc_vitdet.md.
    cfg.MODEL.ATC.REL_POS = "centroid"
    # Dynamic stopping: merge while the linkage distance <= THRESHOLD; < 0 uses KEEP_RATE.
    cfg.MODEL.ATC.THRESHOLD = -1.0
    # Label reuse (MODE "dense", SCOPE "window"): the BLOCKS that cluster; every other block of
    # BLOCKS reuses the partition of the last clustering block before it (its tokens are merged
    # with those labels and its update scattered back). Empty: every block of BLOCKS clusters.
    cfg.MODEL.ATC.CLUSTER_BLOCKS = []
    # Count KEEP_RATE over each image's real area (MODE "dense", THRESHOLD < 0): the input's zero
    # padding (to the square) is one more cluster per window instead of its share of the keep rate.
    cfg.MODEL.ATC.REAL_AREA = False


def add_sec_config(cfg: CN) -> None:
    """Semantic Equitable Clustering attention in ViTDet blocks (``MODEL.SEC.*``)."""
    cfg.MODEL.SEC = CN()
    cfg.MODEL.SEC.ENABLED = False
    # Replace the window partition of windowed blocks by SEC groups of the window's size.
    cfg.MODEL.SEC.WINDOWED = True
    # Split global blocks into this many equal-size SEC groups (1: plain global attention).
    cfg.MODEL.SEC.GLOBAL_GROUPS = 4
    # Blocks that use SEC (empty: all blocks).
    cfg.MODEL.SEC.BLOCKS = []


def add_atc_det_config(cfg: CN) -> None:
    """Add every atc_det key (ViTDet, ATC, SEC, SecViT) to a Detectron2 config."""
    from .modeling.secvit_backbone import add_secvit_config

    add_vitdet_config(cfg)
    add_atc_config(cfg)
    add_sec_config(cfg)
    add_secvit_config(cfg)
