#!/usr/bin/env bash
# Everything a lent GPU must answer, in one command and one report (about 8 minutes on one H100):
#
#   bash scripts/gpu_check.sh [REPORT]        # or: make gpu-check [REPORT=...]
#
# REPORT defaults to $OUT/gpu_check.md when $OUT is set (the device machine's result folder),
# else gpu_check.md. Steps, each under its own `timeout` (seconds: the GPU_CHECK_*_S variables):
#   1. environment: the python used (.venv/bin/python if it runs torch, else python3), torch,
#      triton, the GPU, compute-sanitizer;
#   2. the native C++ kernel built (the reference of the CUDA tests);
#   3. pytest tests/test_cuda.py (the compiled Triton kernel against the C++ kernel and SciPy,
#      sync-free forward, CUDA graphs, torch.compile), in its own process;
#   4. benchmarks/bench_gpu.py at 1024 px, batch 1, bf16, keep 0.5, eager + compiled + graphs;
#   5. compute-sanitizer memcheck / racecheck / initcheck / synccheck on a few small launches of
#      the Triton kernel (skipped, with a note, where compute-sanitizer is missing).
# A failed or timed-out step is reported and the next one runs; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
REPORT=${1:-${OUT:+$OUT/gpu_check.md}}
REPORT=${REPORT:-gpu_check.md}
ENV_S=${GPU_CHECK_ENV_S:-60}
BUILD_S=${GPU_CHECK_BUILD_S:-60}
TEST_S=${GPU_CHECK_TEST_S:-210}
SANITIZER_S=${GPU_CHECK_SANITIZER_S:-25}  # per tool
BENCH_S=${GPU_CHECK_BENCH_S:-150}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Every core of the (dedicated) GPU machine, whatever the Makefile's default for shared machines.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${GPU_CHECK_THREADS:-$(nproc)}
unset TRITON_INTERPRET
mkdir -p "$(dirname "$REPORT")"

if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=.venv/bin/python
else
  PY=$(command -v python3 || command -v python || echo python3)
fi
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)

FAILED=()
SUMMARY=()
{
  echo "# GPU check"
  echo
  COMMIT=$(git rev-parse --short HEAD 2>/dev/null) && { git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT + uncommitted changes"; }
  echo "\`scripts/gpu_check.sh\` on $(hostname), $(date -u +%Y-%m-%dT%H:%MZ); commit ${COMMIT:-unknown (no git)}."
} > "$REPORT"

# step NAME SECONDS COMMAND...: runs COMMAND under `timeout`, its output into the report.
step() {
  local name=$1 seconds=$2 log="$WORK/step.log" start rc status
  shift 2
  echo "== $name (at most ${seconds}s): $*" >&2
  start=$(date +%s)
  timeout --kill-after=10 "$seconds" "$@" > "$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then status=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMED OUT after ${seconds}s"; else status="FAILED (exit $rc)"; fi
  [ $rc -ne 0 ] && FAILED+=("$name")
  SUMMARY+=("| $name | $status | $(( $(date +%s) - start )) |")
  {
    echo
    echo "## $name: $status"
    echo
    echo "\`$*\`"
    echo
    echo '```'
    if [ "$(wc -l < "$log")" -gt 300 ]; then echo "[first 100 and last 200 of $(wc -l < "$log") lines]"; head -100 "$log"; echo "..."; tail -200 "$log"; else cat "$log"; fi
    echo '```'
  } >> "$REPORT"
  tail -5 "$log" >&2
  return 0
}

environment() {  # (run by `bash -c` under timeout: PY and SANITIZER are exported)
  echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
  [ "$PY" = .venv/bin/python ] && echo "(the project's .venv, carried)" || echo "(no usable .venv: system python)"
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
import triton
print("triton", triton.__version__)
for name in ("detectron2", "scipy", "segment_anything"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError as error:
        print(name, "missing:", error)
assert torch.cuda.is_available(), "torch sees no GPU"
EOF
  local rc=$?
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  return $rc
}

cuda_tests() {  # pytest tests/test_cuda.py; a run in which nothing passed (all skipped) fails
  "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_cuda.py | tee "$WORK/pytest.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && return "$rc"
  grep -Eq "[0-9]+ passed" "$WORK/pytest.log" || { echo "no test passed (no GPU seen?)"; return 5; }
}

export PY SANITIZER WORK
export -f environment cuda_tests

cat > "$WORK/sanitized_launch.py" <<'EOF'
"""Small launches of the compiled Triton kernel (3 windows of 196 tokens, each linkage; distances
with padding groups, static K and threshold; +-1 features), checked against the C++ kernel, for
compute-sanitizer. The variants are those tests/test_cuda.py compiled (Triton's cache)."""
import torch

from atc_det.clustering import agglomerative_clustering, cosine_distances

torch.manual_seed(0)
for n in (196,):
    x = torch.randn(3, n, 16)
    valid = torch.arange(n) < torch.tensor([n, n - 5, n // 2])[:, None]
    k = torch.tensor([n // 2, n // 3, n // 4])
    dist = cosine_distances(x)
    for linkage in ("single", "complete", "average"):
        calls = [dict(distances=dist, num_clusters=k, valid=valid),
                 dict(distances=dist, threshold=0.5, valid=valid),
                 dict(metric=x.sign(), num_clusters=k)]  # +-1 features: exact cosines
        for kwargs in calls:
            cuda = {key: value.cuda() if torch.is_tensor(value) else value for key, value in kwargs.items()}
            got = agglomerative_clustering(linkage=linkage, backend="triton", **cuda).cpu()
            expected = agglomerative_clustering(linkage=linkage, backend="native", **kwargs)
            assert torch.equal(got, expected), (n, linkage, list(kwargs))
torch.cuda.synchronize()
print("labels equal the C++ kernel's in every launch")
EOF

step "environment" "$ENV_S" bash -c environment
step "native kernel build" "$BUILD_S" "$PY" -c "from atc_det.clustering import native; print(native.build())"
step "CUDA tests (tests/test_cuda.py)" "$TEST_S" bash -c cuda_tests
step "GPU benchmark (benchmarks/bench_gpu.py)" "$BENCH_S" "$PY" benchmarks/bench_gpu.py --size 1024 \
  --batch 1 --dtype bf16 --runs 5 --keep 0.5 --out "$WORK/bench.md"
if [ -f "$WORK/bench.md" ]; then
  printf '\n## GPU benchmark report\n\n' >> "$REPORT"
  cat "$WORK/bench.md" >> "$REPORT"
fi
if [ -n "$SANITIZER" ]; then
  for tool in memcheck racecheck initcheck synccheck; do
    step "compute-sanitizer $tool" "$SANITIZER_S" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool "$tool" --error-exitcode 3 --print-limit 20 "$PY" "$WORK/sanitized_launch.py"
  done
else
  printf '\n## compute-sanitizer: skipped\n\nNo compute-sanitizer on this machine (not on PATH, not in /usr/local/cuda*/bin).\n' >> "$REPORT"
fi

{
  echo
  echo "## Summary"
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
} >> "$REPORT"
echo "report: $REPORT" >&2
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
