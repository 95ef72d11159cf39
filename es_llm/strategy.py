"""The ES strategy: which members to evaluate (ask), how their rewards move the weights (tell).

`Strategy` holds the seeded generator of population seeds (its state is saved in checkpoints),
antithetic pairing and fitness shaping; `es_update` is the published full-rank update. Both are pure
functions of (weights, seeds, rewards): anyone holding the logged seeds and rewards can recompute
the update exactly.
"""
import numpy as np
import torch

from .noise import per_tensor, tensor_noise
from .shaping import (antithetic_seeds, member_signs, normalize_rewards,  # noqa: F401 (re-exported)
                      shape_fitness, update_terms)

SEED_HIGH = 2**30


class Strategy:
    """ask() draws the population's seeds (numpy, seeded once, as published: N integers in
    [0, 2**30), or N/2 each used by an antithetic +/- pair); tell() turns the population's rewards
    into the update's (seeds, weights): shaped rewards (z-scores by default), one term per
    antithetic pair."""

    def __init__(self, population_size: int, initial_seed: int = 33, antithetic: bool = False,
                 fitness_shaping: str = "zscore", rng_state=None):
        self.population_size, self.antithetic = population_size, antithetic
        self.fitness_shaping = fitness_shaping
        self.rng = np.random.RandomState(initial_seed)
        if rng_state is not None:
            self.rng = rng_from_json(rng_state)
        self.signs = member_signs(population_size, antithetic)

    def ask(self) -> list:
        if not self.antithetic:
            seeds = self.rng.randint(0, SEED_HIGH, size=self.population_size, dtype=np.int64)
        else:
            pairs = self.rng.randint(0, SEED_HIGH, size=self.population_size // 2, dtype=np.int64)
            seeds = antithetic_seeds(pairs)
        return [int(s) for s in seeds]

    def tell(self, seeds, rewards):
        return update_terms(seeds, shape_fitness(rewards, self.fitness_shaping), self.antithetic)

    def state(self) -> list:
        return rng_state_to_json(self.rng)


def rng_state_to_json(rng: np.random.RandomState) -> list:
    name, keys, pos, has_gauss, cached = rng.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def rng_from_json(state) -> np.random.RandomState:
    rng = np.random.RandomState()
    name, keys, pos, has_gauss, cached = state
    rng.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return rng


@torch.no_grad()
def es_update(tensors, seeds, z, alpha: float, noise_mode: str, n: int | None = None) -> None:
    """tensor += alpha * (1/N) * sum_i z_i * eps_i, in place, for every tensor.

    Accumulated in each tensor's own dtype (bf16 for the published path, fp32 for master
    weights), in this exact order: update = sum_i eps_i * z_i; update /= N; tensor += alpha * update.
    The 1/sigma of textbook ES is folded into alpha, as in the paper. N is the population size,
    len(seeds) unless given (antithetic pairs pass one term per pair, see shaping.update_terms).
    """
    n = n or len(seeds)
    weights = [float(zi) for zi in z]

    def step(k, tensor):
        update = torch.zeros_like(tensor)
        for seed, weight in zip(seeds, weights):
            update.add_(tensor_noise(tensor, seed, k, noise_mode).mul_(weight))
        return update.div_(n).mul_(alpha)

    for tensor, delta in per_tensor(tensors, noise_mode, step):
        tensor.add_(delta)
