"""How members are paired and how their rewards become update weights.

Fitness shaping (`--fitness_shaping`):
    zscore         z = (r - mean) / (std + 1e-8), the published normalisation (the default)
    centered_rank  the rewards' ranks scaled to [-0.5, 0.5]; tied rewards share the mean of their
                   ranks, so the result is deterministic and equal rewards give no update

Antithetic sampling (`--antithetic`): members come in +/- pairs; members 2j and 2j+1 share a seed,
2j is perturbed by +sigma * eps and 2j+1 by -sigma * eps. Member i's update weight is z_i * sign_i;
a pair's two weights act on the same noise, so the update regenerates it once, with their sum.
"""
import numpy as np
import torch

FITNESS_SHAPINGS = ("zscore", "centered_rank")


def normalize_rewards(rewards) -> torch.Tensor:
    """z = (r - mean) / (std + 1e-8), population std: the published expression, on a numpy float32
    array (numpy's pairwise sums, so the bits are the published ones), returned as a float32 tensor."""
    r = np.asarray(torch.as_tensor(rewards, dtype=torch.float32).cpu().numpy(), dtype=np.float32)
    z = (r - r.mean()) / (r.std() + 1e-8)
    return torch.from_numpy(np.asarray(z, dtype=np.float32))


def centered_ranks(rewards) -> torch.Tensor:
    """Ranks of the rewards (0 = lowest; ties get their mean rank) scaled to [-0.5, 0.5], float32."""
    r = np.asarray(rewards, dtype=np.float64)
    n = len(r)
    if n < 2:
        return torch.zeros(n, dtype=torch.float32)
    order = np.argsort(r, kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(n, dtype=np.float64)
    for value in np.unique(r):  # ties share the mean of their ranks
        tied = r == value
        ranks[tied] = ranks[tied].mean()
    return torch.as_tensor(ranks / (n - 1) - 0.5, dtype=torch.float32)


def shape_fitness(rewards, method: str = "zscore") -> torch.Tensor:
    if method == "zscore":
        return normalize_rewards(rewards)
    if method == "centered_rank":
        return centered_ranks(rewards)
    raise ValueError(f"unknown fitness shaping {method!r}; expected one of {FITNESS_SHAPINGS}")


def member_signs(population_size: int, antithetic: bool) -> list:
    """+1.0 for every member, or +1, -1, +1, -1, ... when members come in antithetic pairs."""
    if not antithetic:
        return [1.0] * population_size
    return [1.0 if i % 2 == 0 else -1.0 for i in range(population_size)]


def antithetic_seeds(pair_seeds) -> list:
    """Each pair's seed twice: [s0, s0, s1, s1, ...]."""
    return [int(s) for s in pair_seeds for _ in (0, 1)]


def update_terms(seeds, z, antithetic: bool):
    """The (seeds, weights) the update sums over: every member's (seed, z_i), or, for antithetic
    pairs, one term per pair with weight z_2j - z_2j+1 (the minus member moved along -eps)."""
    if not antithetic:
        return list(seeds), z
    z = torch.as_tensor(z, dtype=torch.float32)
    return list(seeds[0::2]), z[0::2] - z[1::2]
