"""SecViT (Fan et al. 2024, arXiv 2405.13337): a hierarchical SEC vision transformer for Detectron2.

Architecture (from the paper and the authors' classification code, github.com/qhfan/SecViT):
- stem: four 3x3 convs with BatchNorm (strides 2, 1, 1, 2; GELU between), stride 4;
- four stages of blocks at strides 4, 8, 16, 32, joined by a 3x3 stride-2 conv + BatchNorm;
- block: ``x + cpe(x)`` (3x3 depth-wise conv position encoding), then pre-LayerNorm SEC attention
  and pre-LayerNorm FFN residuals (layer scale in the last two stages of B and L);
- SEC attention: 1x1-conv qkv, 2-D rotary position embedding on q and k, SEC groups of the keys,
  attention within each group, plus LePE (5x5 depth-wise conv of v), 1x1-conv output projection;
- FFN: 1x1 conv, GELU, 3x3 depth-wise conv with a residual, 1x1 conv;
- classifier head: 1x1 conv to 1024 channels, BatchNorm, Swish, global average pool, 1x1 conv.

SEC groups: the authors' 224x224 models use 32, 8, 2 groups in stages 1-3 (98 tokens each) and
global attention in stage 4. Here a stage's grouping is a group size (tokens per group, 0 = global)
so it carries over to any input size: ``(98, 98, 98, 0)`` gives the authors' groups at 224x224.
"""
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from timm.layers import DropPath

from ..sec import grouped_attention, num_groups_for_size, sec_group_indices

# Variants of the paper (B is the authors' "KClusterFormerSimpleNew_M"); group sizes as above.
SECVIT_VARIANTS = {
    "T": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 9, 2), num_heads=(2, 4, 8, 16),
              layer_scale=(False, False, False, False), drop_path_rate=0.1),
    "S": dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(2, 4, 8, 16),
              layer_scale=(False, False, False, False), drop_path_rate=0.15),
    "B": dict(embed_dims=(80, 160, 320, 512), depths=(4, 8, 26, 8), num_heads=(5, 5, 10, 16),
              layer_scale=(False, False, True, True), drop_path_rate=0.4),
    "L": dict(embed_dims=(112, 224, 448, 640), depths=(4, 8, 26, 8), num_heads=(7, 7, 14, 20),
              layer_scale=(False, False, True, True), drop_path_rate=0.5),
}
# Paper / README: (parameters, FLOPs) of the 1000-class classifiers at 224x224.
SECVIT_PAPER = {"T": (15e6, 2.5e9), "S": (27e6, 4.4e9), "B": (55e6, 9.7e9), "L": (96e6, 18.1e9)}
STAGE_NAMES = ("res2", "res3", "res4", "res5")


def rotary_tables(height: int, width: int, head_dim: int, device=None):
    """2-D rotary embedding: the first half of each head rotates with the row, the second half
    with the column, at ``head_dim // 4`` frequencies from 1 to 1e-4, each on a pair of channels.

    Returns:
        sin, cos: [H * W, head_dim]
    """
    freqs = 1.0 / 10000 ** torch.linspace(0, 1, head_dim // 4, device=device)
    freqs = freqs.repeat_interleave(2)
    rows = torch.arange(height, device=device, dtype=freqs.dtype)[:, None, None] * freqs
    cols = torch.arange(width, device=device, dtype=freqs.dtype)[None, :, None] * freqs
    angles = torch.cat([rows.expand(height, width, -1), cols.expand(height, width, -1)], dim=-1)
    angles = angles.flatten(0, 1)
    return angles.sin(), angles.cos()


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[2i], x[2i+1]) of x [..., N, d] by the angles of ``sin``/``cos``."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SecAttention2d(nn.Module):
    """SEC multi-head attention on a [B, C, H, W] map, with rotary q/k and LePE."""

    def __init__(self, dim: int, num_heads: int, group_size: int):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 4:
            raise ValueError(f"dim {dim} / num_heads {num_heads} must be a multiple of 4")
        self.num_heads = num_heads
        self.group_size = group_size
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.out_proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        batch, dim, height, width = x.shape
        num_tokens = height * width
        qkv = self.qkv(x)
        lepe = self.lepe(qkv[:, 2 * dim:])
        q, k, v = qkv.view(batch, 3, self.num_heads, -1, num_tokens).transpose(-2, -1).unbind(1)
        q = apply_rotary(q, sin, cos)
        k = apply_rotary(k, sin, cos) * self.scale
        num_groups = num_groups_for_size(num_tokens, self.group_size) if self.group_size else 1
        out = grouped_attention(q, k, v, sec_group_indices(k, num_groups))
        out = out.transpose(-2, -1).reshape(batch, dim, height, width)
        return self.out_proj(out + lepe)


class ConvFFN(nn.Module):
    """1x1 conv, GELU, depth-wise 3x3 conv with a residual, 1x1 conv."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x))
        return self.fc2(x + self.dwconv(x))


class SecBlock(nn.Module):
    """CPE, then SEC attention and FFN residuals, optionally with layer scale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        group_size: int,
        mlp_ratio: float,
        drop_path: float,
        layer_scale: bool,
        layer_scale_init: float,
    ):
        super().__init__()
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.attn = SecAttention2d(dim, num_heads, group_size)
        self.norm2 = LayerNorm2d(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, int(mlp_ratio * dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale:
            self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), layer_scale_init))
            self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), layer_scale_init))
        self.layer_scale = layer_scale

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = x + self.cpe(x)
        attn = self.attn(self.norm1(x), sin, cos)
        x = x + self.drop_path(self.gamma_1 * attn if self.layer_scale else attn)
        ffn = self.ffn(self.norm2(x))
        return x + self.drop_path(self.gamma_2 * ffn if self.layer_scale else ffn)


def conv_norm(in_dim: int, out_dim: int, stride: int, norm: str) -> List[nn.Module]:
    """3x3 conv (padding 1) and a Detectron2 norm."""
    return [nn.Conv2d(in_dim, out_dim, 3, stride, 1), get_norm(norm, out_dim)]


class SecViT(Backbone):
    """SecViT body: stem and four SEC stages; outputs ``res2``..``res5`` (strides 4..32)."""

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (3, 4, 18, 4),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratios: Sequence[float] = (3.0, 3.0, 3.0, 3.0),
        group_sizes: Sequence[int] = (98, 98, 98, 0),
        layer_scale: Sequence[bool] = (False, False, False, False),
        layer_scale_init: float = 1e-6,
        drop_path_rate: float = 0.15,
        norm: str = "BN",
        out_features: Sequence[str] = STAGE_NAMES,
        out_norm: bool = True,
        in_chans: int = 3,
    ):
        """
        Args:
            embed_dims, depths, num_heads, mlp_ratios, group_sizes, layer_scale: one per stage;
                group_sizes: tokens per SEC group (0: global attention).
            layer_scale_init: initial layer-scale value.
            drop_path_rate: stochastic depth, linear from 0 to this over all blocks.
            norm: Detectron2 norm of the stem and downsampling convs ("BN", "SyncBN", "FrozenBN").
            out_features: stages to output, among "res2".."res5".
            out_norm: add a LayerNorm to each output (detection); the classifier uses none.
        """
        super().__init__()
        per_stage = dict(embed_dims=embed_dims, depths=depths, num_heads=num_heads,
                         mlp_ratios=mlp_ratios, group_sizes=group_sizes, layer_scale=layer_scale)
        for name, values in per_stage.items():
            if len(values) != 4:
                raise ValueError(f"SecViT needs one value per stage (4) for {name}, got {values}")
        unknown = set(out_features) - set(STAGE_NAMES)
        if unknown or not out_features:
            raise ValueError(f"out_features must be a non-empty subset of {STAGE_NAMES}, got {out_features}")
        half = embed_dims[0] // 2
        self.stem = nn.Sequential(
            *conv_norm(in_chans, half, 2, norm), nn.GELU(),
            *conv_norm(half, half, 1, norm), nn.GELU(),
            *conv_norm(half, half, 1, norm), nn.GELU(),
            *conv_norm(half, embed_dims[0], 2, norm),
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.stages.append(nn.ModuleList(
                SecBlock(embed_dims[i], num_heads[i], group_sizes[i], mlp_ratios[i],
                         rates[first + j], layer_scale[i], layer_scale_init)
                for j in range(depth)
            ))
            if i < 3:
                self.downsamples.append(nn.Sequential(*conv_norm(embed_dims[i], embed_dims[i + 1], 2, norm)))
        self.head_dims = [d // h for d, h in zip(embed_dims, num_heads)]
        self._out_features = [name for name in STAGE_NAMES if name in out_features]
        self._out_feature_channels = dict(zip(STAGE_NAMES, embed_dims))
        self._out_feature_strides = dict(zip(STAGE_NAMES, (4, 8, 16, 32)))
        self.out_norms = nn.ModuleDict(
            {name: LayerNorm2d(self._out_feature_channels[name], eps=1e-6) for name in self._out_features}
            if out_norm else {}
        )
        self.apply(_init_weights)

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: [B, 3, H, W] -> {name: [B, C_i, H / stride_i, W / stride_i]}"""
        x = self.stem(x)
        outputs = {}
        for i, (name, blocks) in enumerate(zip(STAGE_NAMES, self.stages)):
            if i > 0:
                x = self.downsamples[i - 1](x)
            sin, cos = rotary_tables(x.shape[2], x.shape[3], self.head_dims[i], device=x.device)
            for block in blocks:
                x = block(x, sin.to(x.dtype), cos.to(x.dtype))
            if name in self._out_features:
                outputs[name] = self.out_norms[name](x) if name in self.out_norms else x
            if name == self._out_features[-1]:
                break
        return outputs


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class SecViTClassifier(nn.Module):
    """ImageNet classifier of the paper: SecViT body and its conv head (for params / FLOPs)."""

    def __init__(self, num_classes: int = 1000, projection: int = 1024, **body_kwargs):
        super().__init__()
        self.body = SecViT(out_features=("res5",), out_norm=False, **body_kwargs)
        last_dim = self.body.output_shape()["res5"].channels
        self.proj = nn.Conv2d(last_dim, projection, 1)
        self.norm = nn.BatchNorm2d(projection)
        self.head = nn.Conv2d(projection, num_classes, 1)
        _init_weights(self.proj)
        _init_weights(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -> logits [B, num_classes]"""
        x = F.silu(self.norm(self.proj(self.body(x)["res5"])))
        return self.head(F.adaptive_avg_pool2d(x, 1)).flatten(1)


def secvit_classifier(variant: str, **kwargs) -> SecViTClassifier:
    """The paper's SecViT-T/S/B/L ImageNet classifier."""
    if variant not in SECVIT_VARIANTS:
        raise ValueError(f"SecViT variant must be one of {sorted(SECVIT_VARIANTS)}, got {variant!r}")
    return SecViTClassifier(**{**SECVIT_VARIANTS[variant], **kwargs})


def add_secvit_config(cfg: CN) -> None:
    """SecViT backbone keys ``MODEL.SECVIT.*`` (defaults: SecViT-S)."""
    cfg.MODEL.SECVIT = CN()
    cfg.MODEL.SECVIT.EMBED_DIMS = [64, 128, 256, 512]
    cfg.MODEL.SECVIT.DEPTHS = [3, 4, 18, 4]
    cfg.MODEL.SECVIT.NUM_HEADS = [2, 4, 8, 16]
    cfg.MODEL.SECVIT.MLP_RATIOS = [3.0, 3.0, 3.0, 3.0]
    # Tokens per SEC group in each stage (0: global attention); 98 = the paper's groups at 224.
    cfg.MODEL.SECVIT.GROUP_SIZES = [98, 98, 98, 0]
    cfg.MODEL.SECVIT.LAYER_SCALE = [False, False, False, False]
    cfg.MODEL.SECVIT.LAYER_SCALE_INIT = 1e-6
    cfg.MODEL.SECVIT.DROP_PATH_RATE = 0.15
    # Norm of the stem / downsampling convs: "BN", "SyncBN" or "FrozenBN".
    cfg.MODEL.SECVIT.NORM = "BN"
    cfg.MODEL.SECVIT.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # LayerNorm on each output feature map.
    cfg.MODEL.SECVIT.OUT_NORM = True


def build_secvit(cfg: CN, input_shape: ShapeSpec) -> SecViT:
    """The SecViT body from ``MODEL.SECVIT.*``."""
    if "SECVIT" not in cfg.MODEL:
        raise ValueError("cfg has no MODEL.SECVIT keys: call add_secvit_config(cfg) before merging")
    s = cfg.MODEL.SECVIT
    return SecViT(
        embed_dims=s.EMBED_DIMS, depths=s.DEPTHS, num_heads=s.NUM_HEADS, mlp_ratios=s.MLP_RATIOS,
        group_sizes=s.GROUP_SIZES, layer_scale=s.LAYER_SCALE, layer_scale_init=s.LAYER_SCALE_INIT,
        drop_path_rate=s.DROP_PATH_RATE, norm=s.NORM, out_features=s.OUT_FEATURES,
        out_norm=s.OUT_NORM, in_chans=input_shape.channels,
    )


@BACKBONE_REGISTRY.register()
def build_secvit_fpn_backbone(cfg: CN, input_shape: ShapeSpec) -> FPN:
    """SecViT + FPN with outputs p2..p6, as Detectron2's ``build_resnet_fpn_backbone``."""
    return FPN(
        bottom_up=build_secvit(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
