from setuptools import find_packages, setup

setup(
    name="atc_det",
    version="0.1.0",
    description="Agglomerative Token Clustering (ATC) and SEC for ViTDet detectors in Detectron2",
    packages=find_packages(include=["atc_det", "atc_det.*"]),
    package_data={"atc_det": ["csrc/*.cpp"]},  # the native clustering kernel, built on first use
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "fvcore",
        "pycocotools",
        "timm",
        "opencv-python-headless",
        "scipy",
    ],
    extras_require={"bench": ["scikit-learn", "fastcluster"], "test": ["pytest"]},
)
