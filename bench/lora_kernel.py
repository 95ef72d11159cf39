"""The fused CPU LoRA kernel (accelerated/lora_kernel.c) over one engine step of a model's LoRA
layers, on 1 and 2 threads: time per step and the adapter bytes it reads per second.

    python bench/lora_kernel.py                       # SmolLM2-135M's shapes, 30 slots x 2 tokens
    python bench/lora_kernel.py --slots 4 --tokens_per_slot 16 --ranks 1
    python bench/lora_kernel.py --dtype bf16          # a bf16 model's adapters (half the bytes)

One step is what vLLM's LoRA layers ask of the kernel in one decode step: for each decoder layer,
add_lora_linear on q/k/v (3 slices), o, gate/up (2 slices) and down, with `slots` adapters of each
rank, `tokens_per_slot` tokens per adapter (a population's rows: the conciseness unit's 30 members
x 2 prompts by default), in fp32 or bf16, every layer's own weights (as in a model: the adapters do
not stay in the caches from one layer to the next). The first step of each row is untimed (it
prepares each layer's weights once, as a generate call's first step does). No vLLM needed.
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerated import vllm_lora_ops as ops  # noqa: E402


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layers(a, rank: int) -> list:
    """Each LoRA layer of one step: (output slices, A and B stacks, x, y)."""
    g = torch.Generator().manual_seed(rank)
    dtype = DTYPES[a.dtype]
    tokens = a.slots * a.tokens_per_slot
    shapes = [(a.hidden, (a.hidden, a.kv, a.kv)), (a.hidden, (a.hidden,)),
              (a.hidden, (a.intermediate, a.intermediate)), (a.intermediate, (a.hidden,))]
    found = []
    for _ in range(a.layers):
        for width, slices in shapes:
            found.append((slices,
                          tuple(torch.randn(a.slots, 1, rank, width, generator=g).to(dtype)
                                for _ in slices),
                          tuple(torch.randn(a.slots, 1, n, rank, generator=g).to(dtype)
                                for n in slices),
                          torch.randn(tokens, width, generator=g).to(dtype),
                          torch.zeros(tokens, sum(slices), dtype=dtype)))
    return found


def step(wrapper, found) -> None:
    for slices, a_stacked, b_stacked, x, y in found:
        ops.add_lora_linear(wrapper, y, x, a_stacked, b_stacked, 0.5, slices)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=30)
    ap.add_argument("--tokens_per_slot", type=int, default=2)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="the model's dtype: inputs, outputs and adapters")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--kv", type=int, default=192, help="k and v projections' outputs")
    a = ap.parse_args(argv)
    if ops.kernel() is None:
        sys.exit("bench/lora_kernel.py: the kernel could not be built (see above)")
    wrapper = SimpleNamespace(is_prefill=False, no_lora=False, token_lora_indices=torch.arange(
        a.slots).repeat_interleave(a.tokens_per_slot))
    rows = []
    before = torch.get_num_threads()
    for rank in a.ranks:
        found = layers(a, rank)
        adapter_bytes = sum(t.numel() * t.element_size()
                            for _, a_stacked, b, _, _ in found for t in (*a_stacked, *b))
        calls = len(found)
        for threads in a.threads:
            torch.set_num_threads(threads)
            step(wrapper, found)  # untimed: each layer's weights prepared once
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step(wrapper, found)
            seconds = (time.perf_counter() - t0) / a.steps
            rows.append((rank, threads, calls, seconds, adapter_bytes))
        del found
    torch.set_num_threads(before)
    print(f"`{Path(sys.executable).name} {' '.join(sys.argv)}` on {platform.node()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}: "
          f"{a.layers} layers ({a.hidden}/{a.intermediate}/{a.kv}), {a.slots} slots x "
          f"{a.tokens_per_slot} tokens, {a.dtype}, {a.steps} timed steps per row\n")
    print("| rank | threads | calls per step | ms per step | us per call | adapter MB per step "
          "| GB/s |")
    print("|---|---|---|---|---|---|---|")
    for rank, threads, calls, seconds, adapter_bytes in rows:
        print(f"| {rank} | {threads} | {calls} | {seconds * 1e3:.1f} | {seconds / calls * 1e6:.0f} "
              f"| {adapter_bytes / 1e6:.0f} | {adapter_bytes / seconds / 1e9:.1f} |")


if __name__ == "__main__":
    main()
