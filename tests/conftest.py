import os
import subprocess
import sys
from typing import Callable

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return ROOT


@pytest.fixture(scope="session")
def tool_error() -> Callable[..., str]:
    """``tool_error(tool, *args, env=None)`` runs ``tools/<tool>`` in a subprocess, asserts that it
    stopped with exit status 2 and one ``error: ...`` line, the last of stderr, without a
    traceback, and returns that line."""

    def run(tool: str, *args: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", tool), *args], cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), capture_output=True,
            text=True, timeout=600,
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        errors = [line for line in lines if line.startswith("error: ")]
        assert lines and errors == [lines[-1]], result.stderr[-3000:]
        return lines[-1]

    return run
