#!/usr/bin/env bash
# All GPU validation and benchmarking of agem_fast in one call, for a lent GPU machine.
#
#   bench/gpu_check.sh                 # every stage: env build tests bench sanitize profile e2e packlimit
#   bench/gpu_check.sh build,bench     # a subset (comma list), e.g. to split across calls
#
# From a session, through the device tool (one command, at most 10 minutes):
#   bash bench/gpu_wheels.sh           # here first: Avalanche's wheels, into build/gpu_wheels
#   run(command="bash bench/gpu_check.sh", carry=["build/gpu_wheels"])
# (15 device-minutes do not hold every stage: bench/README.md's runbook splits them in two calls)
# The machine has no network: it uses the image's python3 (/opt/torch/.venv, which holds
# torch, pytest, pytest-benchmark, hypothesis, matplotlib) with the repo on PYTHONPATH;
# only the carried wheels (if any) are installed, into a scratch folder.
#
# Stages (each bounded by a timeout; all of them share a budget of GPU_CHECK_BUDGET
# seconds, default 570, so one call ends inside the device tool's 600 s limit; a stage
# the budget no longer fits is recorded as not run; the wheels' install has its own 2 min):
#   env       nvidia-smi (+ -q), python/torch/nvcc versions, `python -m agem_fast info`
#   build     `python -m agem_fast build` (AGEM_FAST_STRICT=1);
#             the extension cache is build/torch_extensions (ignored by git, so a warm
#             machine keeps it between calls)
#   tests     AGEM_FAST_STRICT=1 pytest tests -k "(cuda and not test_build) or test_readme":
#             the CUDA variants of the suite, and the README's examples (on the GPU, the
#             mixed-precision one in fp16); the tensor over 2^31 elements runs when 20 GiB are free,
#             AGEM_FAST_BIG_TESTS=0 skips it). test_build's "cuda" tests only compile (about
#             100 s, 80 s of the last GPU run's stage): every CPU CI runs them already
#   bench     python -m bench.run --devices cuda: --quick (tiny5000 in fp32 only, a second
#             JSON) unless GPU_CHECK_FULL=1; then the pytest-benchmark microbenchmarks on
#             CUDA when time is left
#   sanitize  compute-sanitizer memcheck and racecheck on bench/cuda_sanitize_case.py
#             (PyTorch's caching allocator off, so each tensor is its own allocation)
#   profile   bench/gpu_profile.py: host time, call time and per-kernel device time of the
#             extension and the flat floor (ResNet-18, ViT-B/16, GPT-2; fp32, bf16); then
#             bench/host_overhead.py on CUDA and on CPU tensors (the host time's parts);
#             GPU_PROFILE_ARGS="--routes inline --dtypes fp32" narrows gpu_profile.py
#   e2e       bench/e2e_plugin.py --device cuda: Naive vs Avalanche's AGEMPlugin vs this
#             plugin, end to end (needs Avalanche: see below)
#   packlimit bench/torch_pack_limit.py: the torch backend (the fallback without a CUDA
#             toolkit) at pack limits 2^20..2^23, to choose _torch_backend._PACK_LIMIT
# (they run in that order: tests and benchmarks first, as they matter most.)
# Avalanche is not on the GPU image: run `bash bench/gpu_wheels.sh` on the CPU machine
# first and name build/gpu_wheels in the device tool's `carry` (about 26 MB); the wheels
# are installed here into /tmp/agem_fast_gpu_site. Without them the Avalanche tests skip,
# the bench's Avalanche rows use the algorithm's re-expression and e2e is not run.
#
# Everything is written to bench/results/gpu-<card>-<UTC date>/ (logs, nvidia-smi,
# the benchmark's .json/.md/.png, summary.md). When $OUT is set (the device tool), the
# summary, the benchmark files, nvidia-smi and a .tar.gz of the whole folder are copied
# there (at most 8 files) so they come back; commit them under bench/results/.
# Exit status: non-zero when any stage that ran failed.

set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
STAGES="${1:-${GPU_CHECK_STAGES:-env,build,tests,bench,sanitize,profile,e2e,packlimit}}"
BUDGET="${GPU_CHECK_BUDGET:-570}"
T0=$(date +%s)
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/build/torch_extensions}"
mkdir -p "$TORCH_EXTENSIONS_DIR"

has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# bounded <cap seconds>: the smaller of cap and what the budget has left (at least 1)
bounded() { local l; l=$(left); (( l < $1 )) && echo $(( l > 1 ? l : 1 )) || echo "$1"; }

CARD="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
CARD_SLUG="$(echo "${CARD:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')"
STAMP="$(date -u +%Y%m%d-%H%M)"
RES="${GPU_CHECK_RESULTS_DIR:-$REPO/bench/results}/gpu-${CARD_SLUG}-${STAMP}"  # (another folder: for tests)
mkdir -p "$RES"
SUMMARY="$RES/summary.md"
declare -A STATUS

note() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*"; }

# publish [final]: (re)writes summary.md and, under the device tool, copies it, the main
# result files and a .tar.gz of the whole folder to $OUT. Run after every stage, so that
# a call cut short by the tool still brings back what the stages before had found.
publish() {
  {
    echo "# GPU check: ${CARD:-unknown GPU}, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Stages: $STAGES; $(( $(date +%s) - T0 )) s in all; results folder ${RES#"$REPO"/}"
    echo
    echo "avalanche: $AVALANCHE"
    echo
    echo "| stage | status |"; echo "|---|---|"
    for k in env build tests bench pytest-bench memcheck racecheck profile e2e packlimit; do
      [[ -n "${STATUS[$k]:-}" ]] && echo "| $k | ${STATUS[$k]} |"
    done
    if [[ -f "$RES/tests.log" ]]; then echo; echo '```'; tail -3 "$RES/tests.log"; echo '```'; fi
    for tool in memcheck racecheck; do
      if [[ -f "$RES/$tool.log" ]]; then echo; echo "$tool:"; echo '```'; grep -E "ERROR SUMMARY|sanitize case|FAIL" "$RES/$tool.log" | tail -5; echo '```'; fi
    done
    if [[ -f "$RES/profile.log" ]]; then echo; echo "profile (bench/gpu_profile.py):"; echo '```'; cat "$RES/profile.log"; echo '```'; fi
    if [[ -f "$RES/packlimit.md" ]]; then echo; cat "$RES/packlimit.md"; fi
    if [[ -f "$RES/e2e_plugin_cuda.md" ]]; then echo; echo "e2e (bench/e2e_plugin.py --device cuda):"; sed -n '/^Over /,$p' "$RES/e2e_plugin_cuda.md"; fi
    for md in "$RES/bench-cuda.md" "$RES/bench-cuda-tiny5000.md"; do
      if [[ -f "$md" ]]; then echo; echo "$(basename "$md"):"; sed -n '/^Targets:/,/^peak extra mem/p' "$md"; fi
    done
  } > "$SUMMARY"

  if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
    tar czf "$OUT/gpu-check-${CARD_SLUG}-${STAMP}.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")"
    for f in summary.md bench-cuda.md bench-cuda.json bench-cuda.png bench-cuda-tiny5000.md bench-cuda-tiny5000.json nvidia-smi.txt; do
      [[ -f "$RES/$f" ]] && cp "$RES/$f" "$OUT/"
    done
    [[ "${1:-}" == final ]] && note "copied to \$OUT: $(ls "$OUT" | tr '\n' ' ')"
  fi
}

# want <stage> <seconds>: the stage was asked for and at least that much of the budget is
# left; a stage squeezed out by the budget is recorded as not run, not as failed.
want() {
  has_stage "$1" || return 1
  if (( $(left) < $2 )); then STATUS[$1]="not run: out of time budget"; return 1; fi
}

# Python: the image's interpreter, then whatever python3 is on PATH.
BASE_PY="${PYTHON:-}"
if [[ -z "$BASE_PY" ]]; then
  if [[ -x /opt/torch/.venv/bin/python3 ]]; then BASE_PY=/opt/torch/.venv/bin/python3; else BASE_PY="$(command -v python3)"; fi
fi
PY="$BASE_PY"

# Avalanche, for the plugin's CUDA tests, the benchmark's real-plugin rows and the e2e
# stage: wheels made on the CPU machine by bench/gpu_wheels.sh and carried
# (build/gpu_wheels), installed into a scratch folder, kept only if Avalanche imports.
AVALANCHE="not carried (run bench/gpu_wheels.sh here, then carry build/gpu_wheels)"
if ! ls "$REPO"/build/gpu_wheels/*.whl > /dev/null 2>&1; then
  :
elif [[ ! ",$STAGES," =~ ,(tests|bench|e2e), ]]; then
  AVALANCHE="carried, not installed (no stage of this call needs it)"
else
  SITE=/tmp/agem_fast_gpu_site
  note "installing the carried wheels -> $RES/wheels.log"
  if timeout -k 10 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$SITE" "$REPO"/build/gpu_wheels/*.whl > "$RES/wheels.log" 2>&1 &&
     PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 120 "$PY" -W ignore -c \
       "import avalanche.training, avalanche.benchmarks; from importlib.metadata import version; print('avalanche-lib', version('avalanche-lib'))" \
       >> "$RES/wheels.log" 2>&1; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    AVALANCHE="$(tail -1 "$RES/wheels.log") from the carried wheels"
  else
    AVALANCHE="the carried wheels did not import, left out (wheels.log)"
  fi
fi
note "avalanche: $AVALANCHE"

# ------------------------------------------------------------------ env
if has_stage env; then
  note "env -> $RES/env.txt, nvidia-smi.txt"
  {
    nvidia-smi
    echo; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu,driver_version --format=csv
  } > "$RES/nvidia-smi.txt" 2>&1
  nvidia-smi -q > "$RES/nvidia-smi-q.txt" 2>&1
  {
    echo "date: $(date -u)"; echo "card: $CARD"; uname -a; echo "python: $BASE_PY"
    "$BASE_PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); p = torch.cuda.get_device_properties(0); print(p); print("L2 bytes", getattr(p, "L2_cache_size", "?"))'
    command -v nvcc && nvcc --version
    command -v compute-sanitizer && compute-sanitizer --version
    "$BASE_PY" -m pip list 2>/dev/null | grep -i -E "^(torch|pytest|hypothesis|matplotlib|ninja|pybind11|setuptools|avalanche)" || true
    echo "avalanche: $AVALANCHE"
    nproc; free -g
  } > "$RES/env.txt" 2>&1
  STATUS[env]=ok
fi

# ------------------------------------------------------------------ build
if want build 60; then
  note "build -> $RES/build.log"
  # The repo on PYTHONPATH (no venv, no install): nothing to set up on a bare machine.
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  echo "python for the checks: $PY (PYTHONPATH=$PYTHONPATH)" > "$RES/build.log"
  {
    echo "--- python -m agem_fast build (AGEM_FAST_STRICT=1)"
    AGEM_FAST_STRICT=1 timeout -k 10 "$(bounded 330)" "$PY" -m agem_fast build
    echo "build rc=$?"
    echo "--- python -m agem_fast info"
    "$PY" -m agem_fast info
  } >> "$RES/build.log" 2>&1
  if grep -q "^build rc=0" "$RES/build.log"; then STATUS[build]=ok; else STATUS[build]=FAILED; fi
  tail -5 "$RES/build.log"
fi
# Without the build stage, still make sure the repo is importable.
if ! "$PY" -c "import agem_fast" 2>/dev/null; then export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"; fi

publish

# ------------------------------------------------------------------ tests
if want tests 40; then
  note "tests -> $RES/tests.log"
  AGEM_FAST_STRICT=1 timeout -k 10 "$(bounded 210)" "$PY" -m pytest tests -k "(cuda and not test_build) or test_readme" -q -p no:cacheprovider -rs \
    --junitxml="$RES/tests-junit.xml" > "$RES/tests.log" 2>&1
  rc=$?
  STATUS[tests]=$([[ $rc == 0 ]] && echo ok || echo "FAILED (rc=$rc)")
  tail -3 "$RES/tests.log"
fi

publish

# ------------------------------------------------------------------ bench
if want bench 40; then
  note "bench -> $RES/bench-cuda{,-tiny5000}.{json,md,png}, bench.log"
  if [[ "${GPU_CHECK_FULL:-0}" == 1 ]]; then
    timeout -k 10 "$(bounded 400)" "$PY" -m bench.run --devices cuda --out "$RES" --name bench-cuda \
      > "$RES/bench-cuda.stdout.md" 2> "$RES/bench.log"
    rc=$?
  else
    # --quick, with tiny5000 in fp32 only: its torch-backend rows (0.3-0.5 s a call)
    # took 70 of the 120 s of a quick run with all three dtypes.
    timeout -k 10 "$(bounded 150)" "$PY" -m bench.run --devices cuda --quick --workloads resnet18,vit_b_16,gpt2,llama_1b \
      --out "$RES" --name bench-cuda > "$RES/bench-cuda.stdout.md" 2> "$RES/bench.log"
    rc=$?
    timeout -k 10 "$(bounded 60)" "$PY" -m bench.run --devices cuda --quick --workloads tiny5000 --dtypes fp32 \
      --out "$RES" --name bench-cuda-tiny5000 > "$RES/bench-cuda-tiny5000.stdout.md" 2>> "$RES/bench.log"
    rc=$(( rc | $? ))
  fi
  STATUS[bench]=$([[ $rc == 0 ]] && echo ok || echo "FAILED (rc=$rc)")
  if (( $(left) > 240 )); then
    note "pytest-benchmark microbenchmarks (cuda) -> $RES/pytest-bench.log"
    AGEM_BENCH_DEVICES=cuda AGEM_BENCH_ROUNDS=10 timeout -k 10 "$(bounded 60)" "$PY" -m pytest bench -q -p no:cacheprovider \
      --benchmark-columns=median,iqr,rounds --benchmark-json="$RES/pytest-bench.json" > "$RES/pytest-bench.log" 2>&1
    rc=$?
    STATUS[pytest-bench]=$([[ $rc == 0 ]] && echo ok || echo "FAILED (rc=$rc)")
  else
    STATUS[pytest-bench]="not run: out of time budget"
  fi
fi

publish

# ------------------------------------------------------------------ sanitize
if has_stage sanitize; then  # (memcheck and racecheck check time themselves)
  if command -v compute-sanitizer > /dev/null; then
    for tool in memcheck racecheck; do
      if (( $(left) < 20 )); then STATUS[$tool]="not run: out of time budget"; continue; fi
      note "sanitize $tool -> $RES/$tool.log"
      extra=()
      [[ $tool == memcheck ]] && extra=(--leak-check no)
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 AGEM_FAST_BACKEND=extension timeout -k 10 "$(bounded 90)" \
        compute-sanitizer --tool "$tool" "${extra[@]}" --error-exitcode 99 \
        "$PY" bench/cuda_sanitize_case.py > "$RES/$tool.log" 2>&1
      rc=$?
      STATUS[$tool]=$([[ $rc == 0 ]] && echo ok || echo "FAILED (rc=$rc)")
      tail -3 "$RES/$tool.log"
    done
  else
    STATUS[memcheck]="not run: no compute-sanitizer"; STATUS[racecheck]="${STATUS[memcheck]}"
  fi
fi

publish

# ------------------------------------------------------------------ profile
if want profile 30; then
  note "profile -> $RES/profile.log"
  # shellcheck disable=SC2086  # GPU_PROFILE_ARGS: options for gpu_profile.py, word-split
  timeout -k 10 "$(bounded 150)" "$PY" bench/gpu_profile.py ${GPU_PROFILE_ARGS:-} > "$RES/profile.log" 2>&1
  rc=$?
  # The host time of project_ and of its C++ fast path, on CUDA tensors and on CPU tensors
  # of this machine's CPU: their difference is the CUDA side of a call (allocations, the
  # memset or the table's copy, the launches), the rest is planning and Python.
  for d in cuda cpu; do
    echo >> "$RES/profile.log"
    timeout -k 10 "$(bounded 40)" "$PY" bench/host_overhead.py --device "$d" --calls 1000 --reps 7 \
      >> "$RES/profile.log" 2>&1 || rc=$?
  done
  STATUS[profile]=$([[ $rc == 0 ]] && echo ok || echo "FAILED (rc=$rc)")
fi

publish

# ------------------------------------------------------------------ e2e
if want e2e 30; then
  if "$PY" -c "import avalanche" 2>/dev/null; then
    note "e2e -> $RES/e2e_plugin_cuda.{json,md}, e2e.log"
    timeout -k 10 "$(bounded 150)" "$PY" bench/e2e_plugin.py --device cuda --rounds "${GPU_CHECK_E2E_ROUNDS:-5}" \
      --out "$RES/e2e_plugin_cuda.json" > "$RES/e2e.log" 2>&1
    rc=$?
    STATUS[e2e]=$([[ $rc == 0 ]] && echo ok || echo "FAILED (rc=$rc)")
  else
    STATUS[e2e]="not run: avalanche is $AVALANCHE"
  fi
fi

publish

# ------------------------------------------------------------------ packlimit
if want packlimit 20; then
  note "packlimit -> $RES/packlimit.md"
  timeout -k 10 "$(bounded 60)" "$PY" bench/torch_pack_limit.py > "$RES/packlimit.md" 2> "$RES/packlimit.log"
  rc=$?
  STATUS[packlimit]=$([[ $rc == 0 ]] && echo ok || echo "FAILED (rc=$rc)")
fi

# ------------------------------------------------------------------ summary
publish final

echo
cat "$SUMMARY"
[[ -f "$RES/bench-cuda.md" ]] && grep -E "^\| (resnet18|vit_b_16|gpt2|llama_1b|tiny5000) .*\| (fp32|bf16) \| proj \|" "$RES/bench-cuda.md" | cut -c1-220
fail=0
for k in "${!STATUS[@]}"; do [[ "${STATUS[$k]}" == FAILED* ]] && fail=1; done
exit $fail
