"""What researchers tune beyond the published step: the optimizer on the ES gradient, the
learning-rate schedule, and the training prompts scored per iteration.

    make_optimizer   a torch.optim optimizer over fp32 master tensors (`--optimizer`); sgd has none:
                     it is the published step, alpha * the ES gradient estimate, added in place
    lr_factor        the schedule's multiplier of alpha at an iteration (`--lr_schedule`,
                     `--warmup_iterations`)
    prompt_batch     the training prompts of an iteration (`--prompt_batch N`): the epoch's seeded
                     permutation, N at a time (without replacement within an epoch; the remainder
                     of P / N prompts waits for a later epoch), reshuffled every epoch. A pure
                     function of (seed, iteration), so every process draws the same prompts and a
                     resumed run the same as the uninterrupted one.

The ES gradient estimate g = (1/N) sum_i z_i eps_i is what the published step adds times alpha;
here it is the negated `.grad` of the master tensors (optimizers minimise; ES climbs the reward),
and the optimizer steps with lr = alpha * lr_factor(iteration).
"""
import math

import numpy as np
import torch

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZER_FILE = "optimizer.pt"
_PROMPT_STREAM = 0x5EED  # keeps the prompt sampler's stream apart from the population seeds'


def make_optimizer(name: str, tensors, momentum: float = 0.9, weight_decay: float = 0.01):
    """The torch.optim optimizer of `name` over `tensors` (fp32 masters), or None for sgd."""
    if name == "sgd":
        return None
    if name == "momentum":
        return torch.optim.SGD(tensors, lr=0.0, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(tensors, lr=0.0)
    if name == "adamw":
        return torch.optim.AdamW(tensors, lr=0.0, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


@torch.no_grad()
def optimizer_step(optimizer, tensors, gradients, lr: float) -> None:
    """One step of `optimizer` (over `tensors`) up the ES gradient estimates `gradients` (None for
    a tensor that carries no noise: the optimizer skips it); the gradients are freed after it."""
    for tensor, gradient in zip(tensors, gradients):
        tensor.grad = None if gradient is None else gradient.neg_()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def lr_factor(iteration: int, total: int, schedule: str = "constant", warmup: int = 0) -> float:
    """alpha's multiplier at `iteration` (1-based) of `total`: linear warm-up over the first
    `warmup` iterations (iteration / warmup), then constant 1, linear decay or cosine decay over the
    rest (reaching 0 one iteration past the last)."""
    if iteration <= warmup:
        return iteration / warmup
    if schedule == "constant":
        return 1.0
    progress = (iteration - 1 - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r}; expected one of {LR_SCHEDULES}")


def prompt_batch(seed: int, iteration: int, size: int, num_prompts: int) -> list:
    """The indices of the `size` training prompts of `iteration` (1-based)."""
    if not 1 <= size <= num_prompts:
        raise ValueError(prompt_batch_problem(size, num_prompts))
    per_epoch = num_prompts // size
    epoch, position = divmod(iteration - 1, per_epoch)
    order = np.random.default_rng([_PROMPT_STREAM, seed, epoch]).permutation(num_prompts)
    return [int(i) for i in order[position * size:(position + 1) * size]]


def prompt_batch_problem(size: int, num_prompts: int) -> str:
    return (f"--prompt_batch {size} asks for more prompts per iteration than the task's "
            f"{num_prompts} training prompts; give at most {num_prompts} (or 0 for all of them)")
