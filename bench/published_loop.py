"""The published ES iteration, literally (MISSION.md section 1), kept apart from es_llm so that it
is an independent reference: the tests hold the trainers against it bit for bit
(tests/test_real_model.py) and the benchmarks time it (bench/bench_es.py, bench/work_units.py).

One member at a time: its noise drawn from a fresh generator per tensor and added in the parameter
dtype, the prompts generated greedily, the noise drawn again and subtracted; the rewards, as a float32
tensor then a numpy array, z-scored; every parameter updated by alpha times the mean of z_i * eps_i,
accumulated in its own dtype.
"""
import time

import numpy as np
import torch


def noise(p: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator(device=p.device)
    g.manual_seed(int(seed))
    return torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)


@torch.no_grad()
def published_iteration(canonical, evaluated, seeds, generate, task, sigma: float, alpha: float,
                        noise_mode: str = "correlated", with_prompt: bool = False):
    """One iteration; returns (rewards as float32 values, timings). `evaluated` is the model the
    members perturb: the canonical model itself, as the published scripts' thread 0 does (its
    restore rounding then stays in the weights), or a scratch copy, which gets the canonical
    weights after the update. iid noise seeds the k-th tensor with seed + k."""
    params, base = list(evaluated.parameters()), list(canonical.parameters())
    offset = (lambda k: k) if noise_mode == "iid" else (lambda k: 0)
    timings = {"noise": 0.0, "generate": 0.0, "update": 0.0}
    rewards = torch.zeros(len(seeds), dtype=torch.float32)
    for i, seed in enumerate(seeds):
        t0 = time.perf_counter()
        for k, p in enumerate(params):
            p.add_(sigma * noise(p, seed + offset(k)))
        t1 = time.perf_counter()
        completions = generate(evaluated, with_prompt=with_prompt)
        t2 = time.perf_counter()
        for k, p in enumerate(params):
            p.add_(-sigma * noise(p, seed + offset(k)))
        timings["noise"] += t1 - t0 + time.perf_counter() - t2
        timings["generate"] += t2 - t1
        rewards[i] = float(np.mean(task.score(completions, seed=seed)))
    t0 = time.perf_counter()
    r = rewards.numpy()
    z = (r - r.mean()) / (r.std() + 1e-8)
    for k, p in enumerate(base):
        update = torch.zeros_like(p)
        for seed, zi in zip(seeds, z):
            update.add_(noise(p, seed + offset(k)) * float(zi))
        update.div_(len(seeds))
        p.add_(alpha * update)
    if evaluated is not canonical:
        for dst, src in zip(params, base):
            dst.copy_(src)
    timings["update"] = time.perf_counter() - t0
    return [float(x) for x in rewards], timings
