"""The Triton clustering kernel compiles for real GPUs (sm_80, sm_90) without one, with no
register spills at the project's sizes and default warps, and within an SM's register file at 16
warps, so that it launches (``ptxas -v`` through benchmarks/triton_compile_report.py)."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_kernel_compiles_for_sm80_and_sm90_without_spills():
    """4 warps (the default): no spills. 16 warps (the GPU stress test's largest): registers per
    thread x 512 threads within the 65536 registers of an SM (else the launch fails)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the interpreter does not compile
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_compile_report.py"),
                             "--tokens", "196", "--num-warps", "4", "16"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if re.match(r"\| sm_", line)]
    variants = {(r[0].strip(), r[2].strip(), r[3].strip(), int(r[8])) for r in rows}
    assert variants == {(arch, linkage, source, warps) for arch in ("sm_80", "sm_90")
                        for linkage in ("single", "complete", "average")
                        for source in ("features", "distances") for warps in (4, 16)}
    for row in rows:
        registers, spills, warps = int(row[4]), row[5].strip(), int(row[8])
        assert 0 < registers <= 255 and registers * 32 * warps <= 65536, row
        assert spills == "0 / 0" or warps != 4, row


def test_compile_report_rejects_a_bad_size():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "triton_compile_report.py"),
                             "--tokens", "5000"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --tokens")
    assert "Traceback" not in result.stderr
