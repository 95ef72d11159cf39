#!/usr/bin/env bash
# Worked example: evaluate a Countdown model on the test split (the last 2000 items of
# countdown/data/countdown.json) with transformers, greedy decoding, as in training.
#
#   bash countdown/scripts/eval.sh [MODEL_PATH] [BASE_MODEL] [OUTPUT_DIR]
#
# MODEL_PATH: a trainer's output directory (the final model) or one of its checkpoint-N directories;
# without it the base model itself is evaluated (the baseline to compare against). The script runs
# from the repository root, so relative paths are relative to it.
# Quick smoke test on CPU with the bundled SmolLM2-135M-Instruct (a few minutes):
#   EVAL_SAMPLES=8 MAX_NEW_TOKENS=128 bash countdown/scripts/eval.sh "" bundled
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL_PATH=${1:-}
BASE_MODEL=${2:-Qwen/Qwen2.5-3B-Instruct}
OUTPUT_DIR=${3:-eval_results/countdown_$(basename "${MODEL_PATH:-$BASE_MODEL}")}
EVAL_SAMPLES=${EVAL_SAMPLES:-2000}      # the whole test split
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-1024}  # the training value
BATCH_SIZE=${BATCH_SIZE:-16}

args=(--base_model_name "$BASE_MODEL" --eval_samples "$EVAL_SAMPLES"
      --max_new_tokens "$MAX_NEW_TOKENS" --batch_size "$BATCH_SIZE"
      --show_examples 3 --save_responses --output_dir "$OUTPUT_DIR")
if [[ -n "$MODEL_PATH" ]]; then
    args+=(--model_path "$MODEL_PATH")
fi
python countdown/eval_countdown.py "${args[@]}"
# Sampled instead of greedy:  add --do_sample --temperature 0.7 --top_p 0.9
# summary.json and responses.jsonl (every prompt, response, numbers, target, reward parts) are in
# $OUTPUT_DIR; compare a fine-tuned run with its base model by running this script for both.
