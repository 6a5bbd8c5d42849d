#!/usr/bin/env bash
# Staged GPU validation on one H100/H200 with the stock CUDA PyTorch image (torch, triton, transformers, pytest,
# numpy, matplotlib; no internet). Run from anywhere; vr1fast is put on PYTHONPATH (not pip-installed). Extra
# wheels (e.g. liger_kernel-*.whl) in a git-ignored .whl/ folder are installed into a temporary --target dir.
#
#   scripts/gpu_validate.sh [--only head|step|engine|train|video] [--cpu-smoke] OUT_DIR
#
# Prints the versions first, then per stage its GPU tests (pytest -m gpu) and its benchmarks, each under `timeout`
# so that a stage stays within 5 minutes. Writes OUT_DIR/gpu_validate.log and OUT_DIR/results.tar.gz, holding one
# folder <date>_<gpu>_<commit>/ with the CSV / PNG / JSON / JUnit XML, versions.txt, summary.md (the SPEC verdicts,
# benchmarks/summarize.py) and the log. Default stages: head, then step. --cpu-smoke runs every stage's plumbing on
# the CPU (benchmarks with --cpu-smoke, the GPU tests collected and skipped), as CI does. Exit status 1 if a step
# failed or timed out (the archive is written either way).
#
# Knobs (environment): PYTHON (python3), VR1FAST_COMMIT (the commit when the tree is a copy without .git),
# GV_HEAD_N (token counts of the head benchmarks, in priority order; default 8192,2048,16384),
# GV_STEP_ARGS (bench_step.py's flags; default --layers 4 --base-layers 1 --tokens 128 --reps 2 --warmup 1
# --max-seconds 200), GV_ATTN_N (bench_attention.py's group counts, in priority order; default 8,1,32),
# GV_ROLLOUT_ARGS (bench_rollout.py's flags; default --shape 7b --layers 4 --base-layers 1 --tokens 96 --reps 2
# --warmup 1), GV_TRAIN_ARGS (bench_train_forward.py's flags; default --shape 7b --layers 4 --base-layers 1
# --reps 2 --warmup 1), GV_PATCHIFY_N (bench_patchify.py's frame counts; default 16,32,64), GV_VIDEO_ARGS
# (bench_video.py's flags; default --clips 8 --workers 8 --reps 1 --steps 4).
set -uo pipefail

usage() { echo "usage: scripts/gpu_validate.sh [--only head|step|engine|train|video] [--cpu-smoke] OUT_DIR" >&2; exit 2; }

ONLY="" SMOKE=0 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --only) [ $# -ge 2 ] || usage; ONLY=$2; shift 2 ;;
    --only=*) ONLY=${1#--only=}; shift ;;
    --cpu-smoke) SMOKE=1; shift ;;
    -h|--help) usage ;;
    -*) echo "gpu_validate.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || { echo "gpu_validate.sh: one OUT_DIR only (got $OUT and $1)" >&2; usage; }; OUT=$1; shift ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_validate.sh: OUT_DIR missing" >&2; usage; }
case "$ONLY" in
  ""|head|step|engine|train|video) ;;
  *) echo "gpu_validate.sh: --only $ONLY is not one of head, step, engine, train, video" >&2; exit 2 ;;
esac
if [ -n "$ONLY" ]; then STAGES=$ONLY; elif [ "$SMOKE" = 1 ]; then STAGES="head step engine train video"
else STAGES="head step"; fi

mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
LOG=$OUT/gpu_validate.log
exec > >(tee "$LOG") 2>&1

COMMIT=$(git rev-parse --short HEAD 2>/dev/null) && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] \
  && COMMIT="$COMMIT+dirty"
COMMIT=${COMMIT:-${VR1FAST_COMMIT:-unknown}}
export VR1FAST_COMMIT=$COMMIT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$SMOKE" = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi

SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into $SITE (--no-deps)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
    || echo "warning: the wheels in .whl/ did not install; liger rows will say 'not importable'"
fi
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}

GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' \
  2>/dev/null || echo unknown)
if [ "$SMOKE" = 0 ] && [ "$GPU" = cpu ]; then
  echo "gpu_validate.sh: torch sees no CUDA GPU here (run with --cpu-smoke for the CPU plumbing check)"; exit 1
fi
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)_$(echo "$GPU" | tr -cs 'A-Za-z0-9' '-' | sed 's/-*$//')_${COMMIT//+/-}
WORK=$SITE/$RUN_ID
mkdir -p "$WORK"
FAILED=0

section() { printf '\n==== %s ====\n' "$*"; }

versions() {
  section "versions"
  { echo "run $RUN_ID (cpu-smoke: $SMOKE; stages: $STAGES)"
    echo "commit $COMMIT"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    else
      echo "nvidia-smi: not found"
    fi
    "$PY" - <<'EOF'
import importlib.metadata as md
import platform

import torch

def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "absent"

cuda = torch.cuda.is_available()
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if cuda else "none",
      f"| capability {torch.cuda.get_device_capability(0)}" if cuda else "")
print(" | ".join(f"{d} {version(d)}" for d in ("triton", "transformers", "liger-kernel", "numpy", "matplotlib",
                                                 "pytest")))
print("float32 matmul precision", torch.get_float32_matmul_precision())
EOF
  } 2>&1 | tee "$WORK/versions.txt"
}

# step NAME SECONDS CMD...: run CMD under `timeout`, record ok / FAILED / TIMEOUT in status.txt.
step() {
  local name=$1 limit=$2 start rc status
  shift 2
  section "$name (limit ${limit}s): $*"
  start=$SECONDS
  timeout --kill-after=15 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT after ${limit}s (rows written so far are kept)"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  printf '%-28s %-10s %4ss\n' "$name" "$status" "$((SECONDS - start))" | tee -a "$WORK/status.txt"
}

bench() {  # bench SCRIPT SECONDS [ARGS...]: a benchmark writing into $WORK (tiny CPU shapes under --cpu-smoke)
  local script=$1 limit=$2
  shift 2
  if [ "$SMOKE" = 1 ]; then step "$script" "$limit" "$PY" "benchmarks/$script" --cpu-smoke --out "$WORK"
  else step "$script" "$limit" "$PY" "benchmarks/$script" "$@" --out "$WORK"; fi
}

stage_head() {  # ≤ 300 s: kernel tests ≤ 120, bench_logprobs ≤ 60, bench_grpo_loss ≤ 115
  local n=${GV_HEAD_N:-8192,2048,16384} workers=()
  # On a GPU, 4 pytest-xdist workers compile the Triton kernels in parallel (a cold cache is most of the time).
  if [ "$SMOKE" = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then workers=(-n 4); fi
  step "head: pytest -m gpu" 120 "$PY" -m pytest -m gpu tests/gpu --ignore=tests/gpu/test_gpu_engine.py -v -rs -p no:cacheprovider ${workers[@]+"${workers[@]}"} \
    --junitxml="$WORK/tests_head.xml"
  bench bench_logprobs.py 60 --n "$n" --max-seconds 30
  bench bench_grpo_loss.py 115 --n "$n" --max-seconds 60
}

stage_step() {  # ≤ 300 s: bench_step at reduced depth and forced tokens; it states its extrapolation to 28 layers
  # shellcheck disable=SC2086  # GV_STEP_ARGS is a list of flags
  bench bench_step.py 290 ${GV_STEP_ARGS:---layers 4 --base-layers 1 --tokens 128 --reps 2 --warmup 1 --max-seconds 200}
}

stage_engine() {  # ≤ 300 s: csrc ≤ 30, GPU tests ≤ 100, bench_attention ≤ 50, bench_rollout at reduced depth ≤ 120
  # the C++ block manager for this Python (a copied tree has none, or one for another Python); the Python twin
  # runs if it does not build, and the log says which. Not under --cpu-smoke: that runs in the developer's tree,
  # where rewriting the library in place could break processes that have it loaded.
  if [ "$SMOKE" = 0 ]; then step "engine: build csrc" 30 "$PY" setup.py -q build_ext --inplace; fi
  step "engine: pytest -m gpu" 100 "$PY" -m pytest -m gpu tests/gpu/test_gpu_engine.py tests/kernels/test_attention.py \
    tests/rollout/test_sampling.py -v -rs -p no:cacheprovider --junitxml="$WORK/tests_engine.xml"
  bench bench_attention.py 50 --n "${GV_ATTN_N:-8,1,32}" --max-seconds 40
  # shellcheck disable=SC2086  # GV_ROLLOUT_ARGS is a list of flags
  bench bench_rollout.py 120 ${GV_ROLLOUT_ARGS:---shape 7b --layers 4 --base-layers 1 --tokens 96 --reps 2 --warmup 1}
}

stage_train() {  # ≤ 300 s: GPU tests (flex = dense = repeated on CUDA) ≤ 150, bench_train_forward at reduced depth ≤ 140
  # Not tests/model/test_shared.py: it has no gpu-marked test (-m gpu deselects it all) and its inputs need PyAV
  # (tests/media.py, the synthetic mp4s), which the GPU image lacks; test_gpu_train_forward.py builds its own.
  step "train: pytest -m gpu" 150 "$PY" -m pytest -m gpu tests/gpu/test_gpu_train_forward.py -v -rs -p no:cacheprovider \
    --junitxml="$WORK/tests_train.xml"
  # shellcheck disable=SC2086  # GV_TRAIN_ARGS is a list of flags
  bench bench_train_forward.py 140 ${GV_TRAIN_ARGS:---shape 7b --layers 4 --base-layers 1 --reps 2 --warmup 1}
}

stage_video() {  # ≤ 300 s: the compiled patchify test ≤ 60, bench_patchify ≤ 60, bench_video (CPU decoding) ≤ 170
  # bench_video encodes and decodes H.264 with PyAV, which the stock GPU image lacks: carry its wheel in .whl/ for
  # those rows; without it the step says so and the stage goes on. DALI's NVDEC tests
  # (tests/data/test_dali.py) need DALI (~200 MB), which does not fit a carried call: they run where it is installed.
  step "video: pytest -m gpu" 60 "$PY" -m pytest -m gpu tests/gpu/test_gpu_patchify.py -v -rs -p no:cacheprovider \
    --junitxml="$WORK/tests_video.xml"
  bench bench_patchify.py 60 --n "${GV_PATCHIFY_N:-16,32,64}" --max-seconds 45
  if "$PY" -c "import av" 2>/dev/null; then
    # shellcheck disable=SC2086  # GV_VIDEO_ARGS is a list of flags
    bench bench_video.py 170 ${GV_VIDEO_ARGS:---clips 8 --workers 8 --reps 1 --steps 4}
  else
    printf '%-28s %-10s %4ss\n' "bench_video.py" "skipped (PyAV not importable: carry its wheel)" 0 | tee -a "$WORK/status.txt"
  fi
}

versions
for stage in $STAGES; do
  case $stage in
    head) section "stage head"; stage_head ;;
    step) section "stage step"; stage_step ;;
    engine) section "stage engine"; stage_engine ;;
    train) section "stage train"; stage_train ;;
    video) section "stage video"; stage_video ;;
  esac
done

section "summary"
if compgen -G "$WORK/*.csv" >/dev/null; then
  "$PY" benchmarks/summarize.py "$WORK" --out "$WORK/summary.md" >/dev/null || FAILED=1
else
  echo "# Benchmark summary" >"$WORK/summary.md"
fi
{ printf '\n## Steps of %s\n\n```\n' "$RUN_ID"; cat "$WORK/status.txt"; printf '```\n'; } >>"$WORK/summary.md"
cat "$WORK/summary.md"
cp "$LOG" "$WORK/gpu_validate.log"
tar -czf "$OUT/results.tar.gz" -C "$SITE" "$RUN_ID" || FAILED=1
echo "wrote $LOG and $OUT/results.tar.gz ($RUN_ID/); $( [ $FAILED = 0 ] && echo 'every step ok' || echo 'some step FAILED')"
exit $FAILED
