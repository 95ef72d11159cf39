"""A task is a list of prompts, per-prompt columns, and a reward function: nothing more.

Reward functions follow the TRL convention: `reward_fn(prompts, completions, **columns)` returns one
float per completion; `columns` hold each prompt's extra fields (a target, a list of numbers, ...).
"""
import math
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Task:
    name: str
    prompts: list
    reward_fn: Callable
    columns: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.prompts:
            raise ValueError(f"task {self.name!r} has no prompts; give it at least one")
        for key, values in self.columns.items():
            if len(values) != len(self.prompts):
                raise ValueError(f"task {self.name!r}: column {key!r} has {len(values)} values "
                                 f"for {len(self.prompts)} prompts; give one per prompt")

    def score(self, completions, seed=None) -> list:
        """One reward per completion; a NaN or infinite reward is an error naming seed and prompt."""
        rewards = [float(r) for r in self.reward_fn(self.prompts, completions, **self.columns)]
        for prompt, completion, reward in zip(self.prompts, completions, rewards):
            if not math.isfinite(reward):
                raise ValueError(f"task {self.name!r}: the reward function returned {reward} for "
                                 f"seed {seed} on prompt {prompt!r} (completion {completion[:200]!r}); "
                                 f"rewards must be finite numbers, fix the reward function")
        return rewards


def conciseness_reward(prompts, completions, target, **_) -> list:
    """Minus the absolute difference in characters between the response and its target."""
    return [-abs(len(c) - len(t)) for c, t in zip(completions, target)]
