"""How much the published canonical-weight drift moves the weights, against one ES update.

The published HF scripts evaluate thread 0 on the canonical model: every member that thread
evaluates adds sigma * eps and then adds -sigma * eps in the parameter dtype, and the rounding stays
(`--published_drift`). This measures, on the bundled model at the paper's settings (sigma 0.001,
alpha 0.0005, population 30, correlated noise), the weight change left by those perturb/restore
pairs in one iteration, beside the change of one update (z-scores of random rewards), as the RMS
over all weights and the share of weights that change. Deterministic (no generation, no timing):

    python bench/drift.py [--precision bf16] [--members 8 30]

8 members is thread 0's share with the published 4 threads at population 30; 30 is one thread.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from es_llm.models import load_model  # noqa: E402
from es_llm.noise import add_noise  # noqa: E402
from es_llm.strategy import es_update, normalize_rewards  # noqa: E402


def change(before, after):
    """RMS of after - before (computed in fp32) and the share of entries that changed."""
    total, changed, count = 0.0, 0, 0
    for b, a in zip(before, after):
        d = a.float() - b.float()
        total += float((d * d).sum())
        changed += int((d != 0).sum())
        count += d.numel()
    return (total / count) ** 0.5, changed / count


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precision", default="bf16")
    p.add_argument("--members", type=int, nargs="+", default=[8, 30])
    p.add_argument("--population_size", type=int, default=30)
    p.add_argument("--sigma", type=float, default=0.001)
    p.add_argument("--alpha", type=float, default=0.0005)
    args = p.parse_args()
    model, _ = load_model("bundled", args.precision)
    params = list(model.parameters())
    initial = [t.detach().clone() for t in params]
    rng = np.random.RandomState(33)
    seeds = rng.randint(0, 2**30, size=args.population_size, dtype=np.int64).tolist()
    z = normalize_rewards(rng.normal(size=args.population_size).astype(np.float32))

    updated = [t.clone() for t in initial]
    es_update(updated, seeds, z, args.alpha, "correlated")
    rms_u, share_u = change(initial, updated)
    print(f"| what | RMS change | share of weights changed |\n|---|---|---|")
    print(f"| one update (population {args.population_size}, alpha {args.alpha}) | {rms_u:.3e} | "
          f"{share_u:.2%} |")
    for members in args.members:
        for t, t0 in zip(params, initial):
            t.copy_(t0)
        for seed in seeds[:members]:
            add_noise(params, seed, args.sigma, "correlated")
            add_noise(params, seed, -args.sigma, "correlated")
        rms_d, share_d = change(initial, params)
        print(f"| drift of {members} perturb/restore pairs (sigma {args.sigma}) | {rms_d:.3e} "
              f"({rms_d / rms_u:.2f}x the update) | {share_d:.2%} |")


if __name__ == "__main__":
    main()
