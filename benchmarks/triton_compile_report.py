"""Compile the Triton clustering kernel ahead of time for real GPUs (no GPU needed) and report
what ``ptxas -v`` says: registers per thread, spill stores / loads, stack, shared memory.

    .venv/bin/python benchmarks/triton_compile_report.py [--tokens 196 1024] [--num-warps 4 16] [--out FILE]

Every variant the clustering core launches (linkage x input: features or distances; with padding
groups, static K) is compiled with ``triton.compile`` for sm_80 (A100) and sm_90a (H100 / H200)
at each token count and warp count (default: the launcher's ``NUM_WARPS``), with the launch
options of :func:`atc_det.clustering.triton_kernel.cluster`, and its PTX is assembled by the
``ptxas`` shipped in triton's ``backends/nvidia/bin``. Prints a markdown table (and writes it to
``--out``). A program of W warps can only launch with at most 65536 / (32 W) registers per thread.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("error: unset TRITON_INTERPRET: the interpreter does not compile kernels")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from atc_det.clustering import triton_kernel as tc  # noqa: E402

ARCHS = {"sm_80": (80, "sm_80"), "sm_90": (90, "sm_90a")}  # triton targets sm_90a on Hopper
CONSTEXPRS = ("LINKAGE", "FEATURES", "HAS_GROUPS", "USE_THRESHOLD", "P", "ROWS", "LOG_P")
POINTERS = {"X": "*fp32", "DIST": "*fp32", "G": "*i32", "K": "*i32", "LABELS": "*i64",
            "D": "*fp32", "IS": "*i32", "FS": "*fp32", "THRESHOLD": "*fp32"}


def ptxas_path() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def compile_variant(arch: str, num_tokens: int, linkage: str, features: bool,
                    num_warps: int = tc.NUM_WARPS) -> dict:
    """Compile one variant; returns registers, spills, stack and shared memory (bytes)."""
    capability, gpu_name = ARCHS[arch]
    fn = tc._cluster_kernel
    size = tc.padded_size(num_tokens)
    values = dict(LINKAGE=tc.LINKAGE_CODES[linkage], FEATURES=features, HAS_GROUPS=True,
                  USE_THRESHOLD=False, P=size, ROWS=tc.chunk_rows(size), LOG_P=size.bit_length())
    signature = {name: "constexpr" if name in CONSTEXPRS else POINTERS.get(name, "i32")
                 for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in values.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": num_warps, **tc.launch_options(num_warps)})
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        result = subprocess.run([str(ptxas_path()), "-v", "--gpu-name", gpu_name, str(ptx), "-o",
                                 str(Path(folder) / "kernel.cubin")], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch} {linkage}: {result.stderr.strip()}")
    report = result.stdout + result.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    return dict(arch=arch, tokens=num_tokens, padded=size, linkage=linkage, warps=num_warps,
                max_registers=tc.launch_options(num_warps)["maxnreg"],
                input="features" if features else "distances",
                registers=number(r"Used (\d+) registers"),
                spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"),
                stack=number(r"(\d+) bytes stack frame"),
                shared=int(kernel.metadata.shared), cubin_bytes=len(kernel.asm["cubin"]))


def table(rows: list[dict]) -> str:
    lines = ["| target | N (P) | linkage | input | registers | spill stores / loads (B) | stack (B) "
             "| shared memory (B) | warps |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['tokens']} ({r['padded']}) | {r['linkage']} | {r['input']} "
                     f"| {r['registers']} | {r['spill_stores']} / {r['spill_loads']} | {r['stack']} "
                     f"| {r['shared']} | {r['warps']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[196, 1024])
    parser.add_argument("--num-warps", type=int, nargs="+", default=[tc.NUM_WARPS])
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    bad_warps = [w for w in args.num_warps if w not in tc.WARP_CHOICES]
    if bad_warps:
        print(f"error: --num-warps must be among {tc.WARP_CHOICES}, got {bad_warps}", file=sys.stderr)
        return 2
    bad = [n for n in args.tokens if not 1 <= n <= tc.TRITON_MAX_TOKENS]
    if bad:
        print(f"error: --tokens must lie in 1..{tc.TRITON_MAX_TOKENS} (the kernel's largest N), got {bad}",
              file=sys.stderr)
        return 2
    rows = [compile_variant(arch, n, linkage, features, warps) for warps in args.num_warps
            for n in args.tokens for arch in ARCHS for linkage in tc.LINKAGE_CODES for features in (True, False)]
    options = {warps: tc.launch_options(warps) for warps in args.num_warps}
    text = (f"Triton {triton.__version__}, ptxas of {ptxas_path()} (`ptxas -v`), options by warps "
            f"{options}, compiled on {platform.machine()} without a GPU.\n\n{table(rows)}\n")
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
