#!/usr/bin/env bash
# GPU check (the GPU tier of the verification) for a machine with an NVIDIA GPU and no network.
#
#   scripts/gpu_check.sh            # from the repository root, with the packages already installed
#
# Uses the preinstalled packages through PYTHONPATH=. (nothing is installed). Stages, each logged:
#   1. environment: nvidia-smi, driver, `python -m dwops info` (backends, devices, versions);
#   2. every cupy kernel compiled into CuPy's disk cache in parallel, then `pytest -m gpu` (up to
#      25 failures listed, so one device run shows every broken path) with DWOPS_REQUIRE_GPU=1: a
#      skipped GPU test (a missing package such as numba-cuda, no device seen) is a failure;
#   3. compute-sanitizer memcheck and racecheck on scripts/sanitize_subset.py (every op, both
#      GPU backends, small odd shapes, checked against the reference);
#   4. Nsight Compute, where it runs and the profiler is allowed (ncu --clock-control none): DRAM
#      bytes, global sectors per request, shared-memory bank conflicts and achieved occupancy of
#      every cupy kernel family on one shape each (scripts/profile_subset.py), as CSV; skipped
#      (not failed) where ncu is missing or the counters are refused (ERR_NVGPUCTRPERM);
#   5. the benchmark: the embedded default and every GPU suite, with a time budget so the whole
#      script stays under 8 minutes (rows past the budget are skipped and counted in the table);
#      each row also carries the kernel model's prediction (model_ms) from benchmarks/model/h200.json.
# Writes into $OUT if set, else benchmarks/results/ (at most 8 files): gpu_check-env.txt,
# gpu_check-pytest.log, gpu_check-sanitizer.log, gpu_check-ncu.csv, gpu_check-bench.log,
# DATE-DEVICE.json, DATE-DEVICE.md and gpu_check-summary.md.
# Exit status 1 if any stage failed: a test failure or skip, a sanitizer error, a dwops error or a
# wrong result (an element or max_rel_err over the dtype's tolerance) in the benchmark. Every stage runs regardless, so
# the logs are complete; the summary names the failed stages.
#
# Environment: PYTHON (default python3), DWOPS_GPU_CHECK_SECONDS (whole-script budget, default 450),
# COMPUTE_SANITIZER (path, default: found on PATH or under /usr/local/cuda*/bin), NCU (likewise).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX baselines share the GPU with PyTorch and dwops
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
BUDGET=${DWOPS_GPU_CHECK_SECONDS:-450}
START=$SECONDS
FAILED=()
STATUS=()

elapsed() { echo $((SECONDS - START)); }
left() { echo $((BUDGET - SECONDS + START)); }
# cap LIMIT KEEP: LIMIT, shortened so that KEEP seconds of the budget remain after it (at least 20)
cap() { local c=$(( $(left) - $2 )); (( c > $1 )) && c=$1; (( c < 20 )) && c=20; echo $c; }

# stage NAME LOGFILE TIMEOUT_S COMMAND...: run COMMAND under a timeout, tee its output to LOGFILE.
stage() {
    local name=$1 log=$2 limit=$3
    shift 3
    local t0=$SECONDS rc=0
    echo
    echo "=== [$(elapsed)s] $name: $*" | tee -a "$DEST/$log"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$DEST/$log" || rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "=== $name: TIMED OUT after ${limit}s" | tee -a "$DEST/$log"
    fi
    if [[ $rc -ne 0 ]]; then
        FAILED+=("$name (exit $rc, see $log)")
        STATUS+=("| $name | FAILED (exit $rc) | $((SECONDS - t0)) s | $log |")
    else
        STATUS+=("| $name | ok | $((SECONDS - t0)) s | $log |")
    fi
    echo "=== [$(elapsed)s] $name: exit $rc" | tee -a "$DEST/$log"
}

# ---------------------------------------------------------------------------- 1. environment
ENVLOG=gpu_check-env.txt
: > "$DEST/$ENVLOG"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    echo "python: $(command -v "$PY") $("$PY" --version 2>&1)"
    echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo none)"
} | tee -a "$DEST/$ENVLOG"
stage "nvidia-smi" "$ENVLOG" 30 nvidia-smi
stage "dwops info" "$ENVLOG" 120 "$PY" -m dwops info

# ---------------------------------------------------------------------------- 2. GPU tests
# Every cupy kernel instantiation compiled once, on all CPUs, into CuPy's disk cache: the tests and
# benchmarks then load binaries instead of running NVRTC for ~200 name expressions one by one.
stage "cupy kernel cache" gpu_check-pytest.log "$(cap 120 300)" \
    "$PY" -c "from dwops.kernels.cupy_compile import warm_cache; print(warm_cache(), 'cupy kernels in the cache')"

# Exit status 5 (no test collected) counts as a failure: a GPU check without GPU tests checks nothing.
# DWOPS_REQUIRE_GPU=1 (tests/conftest.py): a skipped GPU test or GPU test module fails.
stage "pytest -m gpu" gpu_check-pytest.log "$(cap 180 220)" \
    env DWOPS_REQUIRE_GPU=1 "$PY" -m pytest -m gpu --maxfail=25 -q -rfE -p no:cacheprovider \
    --continue-on-collection-errors --durations=15 tests
if ! grep -qE "[0-9]+ passed" "$DEST/gpu_check-pytest.log"; then  # all skipped: no GPU seen
    echo "no GPU test passed (all skipped or none collected): is the GPU visible?" | tee -a "$DEST/gpu_check-pytest.log"
    FAILED+=("pytest -m gpu (no test passed)")
    STATUS+=("| pytest -m gpu | FAILED (no test passed) | - | gpu_check-pytest.log |")
fi

# ---------------------------------------------------------------------------- 3. sanitizers
SAN=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1 || true)}
if [[ -z "$SAN" ]]; then
    echo "compute-sanitizer not found" | tee -a "$DEST/gpu_check-sanitizer.log"
    FAILED+=("compute-sanitizer (not found)")
    STATUS+=("| compute-sanitizer | FAILED (not found) | 0 s | gpu_check-sanitizer.log |")
else
    stage "memcheck" gpu_check-sanitizer.log "$(cap 100 140)" \
        "$SAN" --tool memcheck --error-exitcode 1 --print-limit 20 "$PY" scripts/sanitize_subset.py
    stage "racecheck" gpu_check-sanitizer.log "$(cap 80 80)" \
        "$SAN" --tool racecheck --error-exitcode 1 --print-limit 20 "$PY" scripts/sanitize_subset.py --quick
fi

# ---------------------------------------------------------------------------- 4. Nsight Compute
NCU=${NCU:-$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1 || true)}
NCU_METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum
NCU_METRICS+=,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum
NCU_METRICS+=,l1tex__t_requests_pipe_lsu_mem_global_op_st.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum
NCU_METRICS+=,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum
NCU_METRICS+=,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum
NCU_METRICS+=,sm__warps_active.avg.pct_of_peak_sustained_active,launch__occupancy_limit_registers
NCULOG="$DEST/gpu_check-ncu.csv"
if [[ -z "$NCU" ]]; then
    echo "ncu not found: no kernel profile" | tee "$NCULOG"
    STATUS+=("| ncu | skipped (not found) | 0 s | gpu_check-ncu.csv |")
else
    t0=$SECONDS rc=0
    echo "=== [$(elapsed)s] ncu: $NCU scripts/profile_subset.py"
    timeout --signal=TERM --kill-after=10 "$(cap 90 150)" "$NCU" --clock-control none \
        --profile-from-start off --target-processes all --metrics "$NCU_METRICS" --csv \
        --log-file "$NCULOG" "$PY" scripts/profile_subset.py || rc=$?
    if grep -qE "ERR_NVGPUCTRPERM|profiling is not supported|permission" "$NCULOG" 2>/dev/null; then
        echo "ncu: the performance counters are refused on this machine: profile skipped" | tee -a "$NCULOG"
        STATUS+=("| ncu | skipped (counters refused) | $((SECONDS - t0)) s | gpu_check-ncu.csv |")
    elif [[ $rc -ne 0 ]]; then
        FAILED+=("ncu (exit $rc, see gpu_check-ncu.csv)")
        STATUS+=("| ncu | FAILED (exit $rc) | $((SECONDS - t0)) s | gpu_check-ncu.csv |")
    else
        STATUS+=("| ncu | ok ($(grep -c '"dram__bytes_read.sum"' "$NCULOG" || true) kernels) | $((SECONDS - t0)) s | gpu_check-ncu.csv |")
    fi
    echo "=== [$(elapsed)s] ncu: exit $rc"
fi

# ---------------------------------------------------------------------------- 5. benchmarks
LEFT=$(( $(left) - 25 ))  # kept for start-up, the copy-bandwidth measurement and the summary
if [[ $LEFT -lt 60 ]]; then
    echo "only ${LEFT}s of the ${BUDGET}s budget left: running the default suite alone" | tee -a "$DEST/gpu_check-bench.log"
    SUITES=(--suite default)
    (( LEFT < 20 )) && LEFT=20
else
    SUITES=(--suite default --suite gpu --suite models)
fi
# the kernel model's committed predictions (python -m dwops model, made without a GPU) join the
# measured rows as model_ms, so the results carry model and measurement side by side
MODEL=()
[[ -f benchmarks/model/h200.json ]] && MODEL=(--model benchmarks/model/h200.json)
stage "bench" gpu_check-bench.log $((LEFT + 40)) \
    "$PY" -m dwops bench "${SUITES[@]}" --device gpu --budget "$LEFT" --out "$DEST" "${MODEL[@]}"

# ---------------------------------------------------------------------------- summary
SUMMARY="$DEST/gpu_check-summary.md"
{
    echo "# dwops GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed) s"
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /' || true
    echo
    echo "| stage | result | time | log |"
    echo "|---|---|---|---|"
    printf '%s\n' "${STATUS[@]}"
    echo
    if [[ ${#FAILED[@]} -gt 0 ]]; then
        echo "**FAILED**: ${FAILED[*]}"
    else
        echo "All stages passed."
    fi
    echo
    MD=$(ls -t "$DEST"/*.md 2>/dev/null | grep -v gpu_check- | head -n 1 || true)
    if [[ -n "$MD" ]]; then
        echo "## Benchmark ($(basename "$MD"))"
        echo
        cat "$MD"
    fi
} > "$SUMMARY"
echo
sed -n '1,20p' "$SUMMARY"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "GPU CHECK FAILED: ${FAILED[*]}" >&2
    exit 1
fi
echo "GPU check passed in $(elapsed) s"
