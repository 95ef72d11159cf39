"""A task is a list of prompts, per-prompt columns, and a reward function: nothing more.

Reward functions follow TRL's convention: called with keywords, `reward_fn(prompts=...,
completions=..., **columns)`, they return one float per completion; `columns` hold each prompt's
extra fields (a target, a list of numbers, ...).

Your own task, without editing the package (`--task PATH.py` on every trainer): a Python file that
defines `reward(completions, prompts, **columns) -> list[float]` and either `DATASET`, a list of dicts
each with a "prompt" key (the other keys become columns), or `load_dataset()` returning such a list;
`--data PATH` (a JSON list, or JSONL, of such rows) replaces the file's own rows. `NAME` (optional)
names the task (default: the file's name). See examples/.
"""
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
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
        rewards = [float(r) for r in self.reward_fn(prompts=self.prompts, completions=completions,
                                                     **self.columns)]
        if len(rewards) != len(completions):
            raise ValueError(f"task {self.name!r}: the reward function returned {len(rewards)} "
                             f"rewards for {len(completions)} completions; return one per "
                             f"completion")
        for prompt, completion, reward in zip(self.prompts, completions, rewards):
            if not math.isfinite(reward):
                raise ValueError(f"task {self.name!r}: the reward function returned {reward} for "
                                 f"seed {seed} on prompt {prompt!r} (completion {completion[:200]!r}); "
                                 f"rewards must be finite numbers, fix the reward function")
        return rewards


def conciseness_reward(prompts, completions, target, **_) -> list:
    """Minus the absolute difference in characters between the response and its target."""
    return [-abs(len(c) - len(t)) for c, t in zip(completions, target)]


def read_rows(path) -> list:
    """Rows from a JSON list or a JSONL file, each a dict with a "prompt" key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file; give a JSON list or JSONL file of "
                                f"rows with a \"prompt\" key")
    text = path.read_text()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as error:
        raise ValueError(f"--data {path}: not a JSON list or JSONL file ({error})") from error
    return rows


def task_from_rows(name: str, rows, reward, source: str) -> Task:
    """A Task from rows with a "prompt" key (the other keys become columns, present in every row)."""
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{source}: the dataset must be a non-empty list of dicts with a "
                         f"\"prompt\" key (got {type(rows).__name__})")
    bad = [i for i, row in enumerate(rows) if not isinstance(row, dict)
           or not isinstance(row.get("prompt"), str)]
    if bad:
        raise ValueError(f"{source}: row {bad[0]} has no \"prompt\" string; every row needs one "
                         f"({len(bad)} rows lack it)")
    keys = [k for k in rows[0] if k != "prompt"]
    missing = [(i, k) for i, row in enumerate(rows) for k in keys if k not in row]
    if missing:
        raise ValueError(f"{source}: row {missing[0][0]} lacks the column {missing[0][1]!r} that "
                         f"row 0 has; give every row the same keys")
    return Task(name, [row["prompt"] for row in rows], reward,
                {k: [row[k] for row in rows] for k in keys})


def load_task_file(path, data=None) -> Task:
    """The task a `--task PATH.py` file defines (module docstring above); `data` replaces its rows."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise FileNotFoundError(f"--task {path}: no such Python file; give a .py file defining "
                                f"reward() and DATASET or load_dataset() (see examples/)")
    spec = importlib.util.spec_from_file_location(f"es_task_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reward = getattr(module, "reward", None)
    if not callable(reward):
        raise ValueError(f"--task {path}: defines no reward(completions, prompts, **columns) "
                         f"function returning one float per completion")
    if data is not None:
        rows, source = read_rows(data), f"--data {data}"
    elif hasattr(module, "DATASET"):
        rows, source = module.DATASET, f"{path}: DATASET"
    elif callable(getattr(module, "load_dataset", None)):
        rows, source = module.load_dataset(), f"{path}: load_dataset()"
    else:
        raise ValueError(f"--task {path}: defines neither DATASET (a list of dicts with a "
                         f"\"prompt\" key) nor load_dataset(); add one, or give --data PATH")
    return task_from_rows(getattr(module, "NAME", path.stem), rows, reward, source)
