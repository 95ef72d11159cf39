#!/usr/bin/env bash
# Evaluate a Countdown model on the test split (the last 2000 items of countdown/data/countdown.json)
# with transformers and greedy decoding, as published:
#
#   MODEL_PATH=RUN_DIR BASE_MODEL_NAME=Qwen/Qwen2.5-3B-Instruct bash countdown/scripts/eval.sh
#
# MODEL_PATH (required): a trainer's output directory, a checkpoint-N directory, a model (hub id,
# directory, .gguf, bundled) or a weights file (.pth) applied to BASE_MODEL_NAME. BASE_MODEL_NAME is
# optional (guessed from MODEL_PATH when empty). Runs from the repository root, so relative paths are
# relative to it. Extra arguments go to countdown/eval_countdown.py (e.g. --output_dir DIR).
# Published settings: 2000 samples at offset -2000, batch 500, 1024 new tokens, responses saved,
# 5 examples printed. EVAL_SAMPLES, BATCH_SIZE and MAX_NEW_TOKENS override them, e.g. a quick CPU
# smoke test with the bundled SmolLM2-135M-Instruct:
#   MODEL_PATH=bundled EVAL_SAMPLES=8 BATCH_SIZE=8 MAX_NEW_TOKENS=128 bash countdown/scripts/eval.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL_PATH=${MODEL_PATH:-}
BASE_MODEL_NAME=${BASE_MODEL_NAME:-}
if [[ -z "$MODEL_PATH" ]]; then
    echo "error: set MODEL_PATH (and optionally BASE_MODEL_NAME), e.g." >&2
    echo "  MODEL_PATH=RUN_DIR bash countdown/scripts/eval.sh" >&2
    exit 2
fi
EVAL_SAMPLES=${EVAL_SAMPLES:-2000}
BATCH_SIZE=${BATCH_SIZE:-500}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-1024}

args=(--model_path "$MODEL_PATH")
if [[ -n "$BASE_MODEL_NAME" ]]; then
    args+=(--base_model_name "$BASE_MODEL_NAME")
fi
args+=(--eval_samples "$EVAL_SAMPLES" --eval_offset "-$EVAL_SAMPLES"
       --batch_size "$BATCH_SIZE" --max_new_tokens "$MAX_NEW_TOKENS"
       --save_responses --show_examples 5)
python countdown/eval_countdown.py "${args[@]}" "$@"
# summary.json and eval_detailed_results.json are written to ./inference_results_<model>/ (or
# --output_dir). Sampled instead of greedy: add --do_sample (temperature 0.8, top_p 0.9 by default).
