"""Milliseconds per decoding step of the bundled model at a given batch and cache length.

    python bench/decode_probe.py ROWS CACHE_LENGTH STEPS [sdpa|shared_kv][+mallopt]

A random bf16 key/value cache of CACHE_LENGTH tokens for ROWS rows (half of them left-padded by 20
tokens, so the attention gets a mask, as in generation), then STEPS decoding steps. Prints ms per
step, minor page faults per step and the system CPU time. `sdpa`: transformers' own attention
(copies the shared key/value heads, `repeat_kv`); `shared_kv`: es_llm/attention.py (what
load_model uses); `+mallopt`: glibc told to keep freed memory (M_MMAP_THRESHOLD 1 GiB,
M_TRIM_THRESHOLD 2 GiB), for comparison only.
"""
import ctypes
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.profile_lowrank import faults_and_system_s  # noqa: E402
from es_llm.models import load_model  # noqa: E402


def main():
    rows, length, steps = (int(x) for x in sys.argv[1:4])
    mode = sys.argv[4] if len(sys.argv) > 4 else "shared_kv"
    if "mallopt" in mode:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD
    torch.set_grad_enabled(False)
    model, _ = load_model("bundled", "bf16")
    if mode.startswith("sdpa"):
        model.set_attn_implementation("sdpa")
    cfg = model.config
    heads, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(rows, heads, length, dim, dtype=torch.bfloat16) * 0.1,
                     torch.randn(rows, heads, length, dim, dtype=torch.bfloat16) * 0.1, layer)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[: rows // 2, :20] = 0
    position = (mask.cumsum(-1) - 1)[:, -1:]
    ids = torch.full((rows, 1), 100)
    faults, system = faults_and_system_s()
    t0 = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
        position = position + 1
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        ids = logits[:, -1:].argmax(-1)
    seconds = time.perf_counter() - t0
    faults_after, system_after = faults_and_system_s()
    print(f"{mode}: rows {rows}, cache {length}, {steps} steps: {seconds / steps * 1000:.0f} ms/step, "
          f"{(faults_after - faults) / steps / 1e3:.0f}k page faults/step, system "
          f"{system_after - system:.1f} s")


if __name__ == "__main__":
    main()
