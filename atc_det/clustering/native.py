"""Native CPU backend of the clustering core (``csrc/rnn_rounds.cpp``), built on first use.

The kernel runs the same nearest-neighbour rounds, tie rules and cut as the torch backend
(:mod:`atc_det.clustering.torch_rounds`), one sample per thread, and returns the labels. It is compiled with the
system C++ compiler (``$CXX`` or ``g++``) into a cache directory (``$ATC_DET_NATIVE_CACHE`` or
``~/.cache/atc_det``), keyed by the source, the compiler and the CPU, and loaded with ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from atc_det.clustering.contract import LINKAGE_CODES, NATIVE_MAX_TOKENS, non_finite_error

SOURCE = Path(__file__).with_name("csrc") / "rnn_rounds.cpp"
NON_FINITE = 2  # kernel status: a feature is NaN or Inf
# The constants the kernel shares with the other backends, as compiler definitions.
_DEFINES = [f"-DATC_LINKAGE_{name.upper()}={code}" for name, code in LINKAGE_CODES.items()] + [
    f"-DATC_MAX_TOKENS={NATIVE_MAX_TOKENS}", f"-DATC_STATUS_NON_FINITE={NON_FINITE}"]
# No floating-point contraction: average linkage rounds as the Triton kernel does (no FMA).
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off",
          *_DEFINES] + (["-mprefer-vector-width=512"] if platform.machine() == "x86_64" else [])
_library: ctypes.CDLL | None = None
_build_error: str | None = None


class NativeUnavailable(RuntimeError):
    """The native kernel could not be built or loaded (message says why and what to do)."""


def _compiler() -> str:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise NativeUnavailable(
            f"no C++ compiler {compiler!r} found to build the native clustering kernel; install "
            f"g++ (e.g. apt-get install g++) or set CXX, or pass backend='torch'")
    return compiler


def _cache_dir() -> Path:
    return Path(os.environ.get("ATC_DET_NATIVE_CACHE", Path.home() / ".cache" / "atc_det"))


def library_path() -> Path:
    """Where the kernel for this source, compiler and CPU is (or will be) cached."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else platform.processor()
    flags = next((line for line in cpu.splitlines() if line.startswith("flags")), cpu)
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(_FLAGS),
                                    platform.machine(), flags]).encode()).hexdigest()[:16]
    return _cache_dir() / f"rnn_rounds-{key}.so"


def compile_kernel(source: Path, out: Path, extra_flags: Sequence[str] = ()) -> None:
    """Compile a kernel source file into the shared library ``out``; ``extra_flags`` go after the
    default flags (e.g. ``["-mno-avx512f"]`` for the portable code path)."""
    result = subprocess.run([_compiler(), *_FLAGS, *extra_flags, "-o", str(out), str(source)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise NativeUnavailable(f"building {source} failed:\n{result.stderr.strip()}")


def load_library(path: Path) -> ctypes.CDLL:
    """Load a compiled kernel and declare its C functions."""
    library = ctypes.CDLL(str(path))
    for name in ("atc_cluster_f32", "atc_cluster_f64"):
        function = getattr(library, name)
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                             ctypes.c_double, ctypes.c_void_p, ctypes.c_int]
    return library


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` across processes (fcntl on POSIX, msvcrt on
    Windows), waiting as long as another process holds it."""
    with open(path, "ab") as file:  # never truncated: another process may hold its lock
        if sys.platform != "win32":
            import fcntl

            fcntl.flock(file, fcntl.LOCK_EX)  # released when the file is closed
            yield
            return
        import msvcrt

        while True:
            try:
                msvcrt.locking(file.fileno(), msvcrt.LK_LOCK, 1)  # gives up after about 10 s
                break
            except OSError as error:
                if error.errno != errno.EDEADLOCK:
                    raise
        try:
            yield
        finally:
            file.seek(0)
            msvcrt.locking(file.fileno(), msvcrt.LK_UNLCK, 1)


def build() -> Path:
    """Compile the kernel into the cache unless it is there (safe across processes)."""
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_suffix(".lock")):
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                out = Path(tmp) / target.name
                compile_kernel(SOURCE, out)
                os.replace(out, target)
    return target


def cluster_library() -> ctypes.CDLL:
    global _library, _build_error
    if _library is not None:
        return _library
    if _build_error is not None:
        raise NativeUnavailable(_build_error)
    try:
        library = load_library(build())
    except (NativeUnavailable, OSError) as error:
        _build_error = str(error)
        raise NativeUnavailable(_build_error) from None
    _library = library
    return library


def available() -> bool:
    """True if the kernel is built (or can be built now) and loads."""
    try:
        cluster_library()
    except NativeUnavailable:
        return False
    return True


def unavailable_reason() -> str | None:
    """Why the kernel failed to build or load (None if it has not failed)."""
    return _build_error


def cluster(linkage: str, num_merges: Tensor | None, threshold: float | None, groups: Tensor | None, *,
            distances: Tensor | None = None, features: Tensor | None = None,
            library: ctypes.CDLL | None = None) -> Tensor:
    """Labels [B, N] int64 (first-member order), from exactly one of:

    ``distances`` [B, N, N]: symmetric distances (overwritten), or ``features`` [B, N, C]: token
    features, normalised (as ``torch.nn.functional.normalize``) and compared by cosine distance
    ``max(1 - <u_i, u_j>, 0)`` inside the kernel, which also checks that they are finite. Both
    CPU float32/float64. ``groups`` [B, N] int64: tokens of different groups never merge. Exactly
    one of ``num_merges`` [B] int (static: the N - K lowest merges of each sample) and
    ``threshold``. ``library``: a
    kernel from :func:`load_library` instead of the built one (for A/B timing).
    """
    library = library or cluster_library()
    data = features if distances is None else distances
    if data.dtype not in (torch.float32, torch.float64) or data.device.type != "cpu":
        raise TypeError(f"native clustering needs CPU float32/float64 tensors, got {data.dtype} on "
                        f"{data.device}")
    data = data.contiguous()
    batch, num_tokens = data.shape[:2]
    if num_tokens > NATIVE_MAX_TOKENS:
        raise ValueError(f"native clustering supports at most {NATIVE_MAX_TOKENS} tokens, got "
                         f"{num_tokens}; pass backend='torch'")
    labels = torch.empty(batch, num_tokens, dtype=torch.long)
    if batch == 0:
        return labels
    if groups is not None:
        groups = groups.to(torch.long).contiguous()
    if num_merges is not None:
        num_merges = num_merges.to(device="cpu", dtype=torch.long).contiguous()
    function = library.atc_cluster_f32 if data.dtype == torch.float32 else library.atc_cluster_f64
    status = function(data.data_ptr() if distances is not None else None,
                      data.data_ptr() if features is not None else None, batch, num_tokens,
                      data.shape[2] if features is not None else 0,
                      None if groups is None else groups.data_ptr(), LINKAGE_CODES[linkage],
                      None if num_merges is None else num_merges.data_ptr(), int(threshold is not None),
                      0.0 if threshold is None else float(threshold), labels.data_ptr(),
                      torch.get_num_threads())
    if status == NON_FINITE:
        raise non_finite_error("metric")
    if status != 0:
        raise RuntimeError(f"native clustering failed with status {status}")
    return labels
