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
import inspect
import json
import math
import numbers
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

# What a reward function may return, one entry per completion (README, "Your own task").
REWARD_CONTRACT = ("a list or tuple of real numbers (Python or numpy ints and floats, not bools), "
                   "or a 1-D numpy array or torch tensor of them")


class RewardError(ValueError):
    """A reward function broke its contract: it raised, or returned something other than one real
    number per completion."""


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_real(value) -> bool:
    return (isinstance(value, (numbers.Real, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


def reward_values(returned) -> list | None:
    """The rewards as Python floats, or None when `returned` breaks REWARD_CONTRACT."""
    if type(returned).__name__ == "Tensor" and hasattr(returned, "detach"):  # torch, not imported
        if returned.ndim != 1 or returned.is_complex() or str(returned.dtype) == "torch.bool":
            return None
        return [float(x) for x in returned.detach().double().cpu().tolist()]
    if isinstance(returned, np.ndarray):
        if returned.ndim != 1 or returned.dtype.kind not in "iuf":
            return None
        return [float(x) for x in returned]
    if not isinstance(returned, (list, tuple)) or not all(_is_real(x) for x in returned):
        return None
    return [float(x) for x in returned]


@dataclass
class Task:
    """`source` says where the task comes from (a --task file's path), for error messages;
    `heldout` (optional) returns the task on its held-out prompts (--eval_every)."""
    name: str
    prompts: list
    reward_fn: Callable
    columns: dict = field(default_factory=dict)
    source: str = ""
    heldout: Callable | None = None

    def __post_init__(self):
        if not self.prompts:
            raise ValueError(f"task {self.name!r} has no prompts; give it at least one")
        for key, values in self.columns.items():
            if len(values) != len(self.prompts):
                raise ValueError(f"task {self.name!r}: column {key!r} has {len(values)} values "
                                 f"for {len(self.prompts)} prompts; give one per prompt")
        self.check_reward_signature()

    @property
    def where(self) -> str:
        name = getattr(self.reward_fn, "__name__", repr(self.reward_fn))
        return f"{self.source or f'task {self.name!r}'}: {name}()"

    def check_reward_signature(self) -> None:
        """The reward is called with prompts=, completions= and one keyword per column: a required
        parameter that nothing feeds, or a column it cannot take, is named before any work."""
        try:
            parameters = inspect.signature(self.reward_fn).parameters.values()
        except (TypeError, ValueError):  # a builtin or C callable: nothing to read
            return
        given = ["prompts", "completions", *self.columns]
        kinds = inspect.Parameter
        takes_any = any(p.kind == kinds.VAR_KEYWORD for p in parameters)
        named = {p.name for p in parameters if p.kind in (kinds.POSITIONAL_OR_KEYWORD,
                                                           kinds.KEYWORD_ONLY)}
        columns = ", ".join(repr(c) for c in self.columns) or "none"
        for p in parameters:
            if p.kind == kinds.POSITIONAL_ONLY and p.default is p.empty:
                raise ValueError(f"{self.where} takes {p.name!r} by position only; it is called "
                                 f"with keywords (prompts=, completions=, one per column): drop "
                                 f"the '/' from its signature")
            if p.name in named and p.default is p.empty and p.name not in given:
                raise ValueError(f"{self.where} needs the parameter {p.name!r}, which no column "
                                 f"of the data provides (columns: {columns}); add a {p.name!r} "
                                 f"key to every row, give it a default, or rename it")
        unknown = [k for k in given if k not in named]
        if unknown and not takes_any:
            raise ValueError(f"{self.where} is called with {', '.join(map(repr, unknown))} but "
                             f"takes no such parameter; add them, or **columns to its signature")

    def subset(self, indices) -> "Task":
        """The task on the prompts `indices` only (an iteration's --prompt_batch)."""
        return Task(self.name, [self.prompts[i] for i in indices], self.reward_fn,
                    {k: [values[i] for i in indices] for k, values in self.columns.items()},
                    self.source)

    def mean_reward(self, rollouts, seed=None) -> float:
        """A member's reward: the mean, over its rollouts (lists of completions, one per prompt),
        of the mean reward over the prompts."""
        return float(np.mean([np.mean(self.score(completions, seed=seed))
                              for completions in rollouts]))

    def score(self, completions, seed=None) -> list:
        """One reward per completion, checked against REWARD_CONTRACT; a reward function that
        raises, returns something else, or gives a NaN or infinite reward is a RewardError naming
        the task file, the function and the member's seed."""
        try:
            returned = self.reward_fn(prompts=self.prompts, completions=completions,
                                      **self.columns)
        except Exception as error:
            frame = traceback.extract_tb(error.__traceback__)[-1]
            raise RewardError(f"{self.where} raised {type(error).__name__}: {error} (at "
                              f"{frame.filename}, line {frame.lineno}) for seed {seed}; fix the "
                              f"reward function") from error
        rewards = reward_values(returned)
        if rewards is None:
            raise RewardError(f"{self.where} returned {type(returned).__name__} "
                              f"{_short(returned)} for seed {seed}; expected {len(completions)} "
                              f"rewards, one per completion: {REWARD_CONTRACT}")
        if len(rewards) != len(completions):
            raise RewardError(f"{self.where} returned {len(rewards)} rewards for "
                              f"{len(completions)} completions (seed {seed}); expected one per "
                              f"completion: {REWARD_CONTRACT}")
        for prompt, completion, reward in zip(self.prompts, completions, rewards):
            if not math.isfinite(reward):
                raise RewardError(f"{self.where} returned {reward} for seed {seed} on prompt "
                                  f"{prompt!r} (completion {completion[:200]!r}); rewards must "
                                  f"be finite numbers, fix the reward function")
        return rewards


def conciseness_reward(prompts, completions, target, **_) -> list:
    """Minus the absolute difference in characters between the response and its target."""
    return [-abs(len(c) - len(t)) for c, t in zip(completions, target)]


# The conciseness task's two training prompts and their targets (MISSION.md section 2).
CONCISENESS_PROMPTS = ["Solve: 3 + 5 =",
                       "If all birds can fly and penguins are birds, can penguins fly?"]
CONCISENESS_TARGETS = ["8", "No"]


# The held-out prompts and targets eval_conciseness.py evaluates on.
CONCISENESS_HELDOUT = Path(__file__).resolve().parents[1] / "data" / "conciseness_eval.json"


def conciseness_task() -> Task:
    return Task("conciseness", CONCISENESS_PROMPTS, conciseness_reward,
                {"target": CONCISENESS_TARGETS}, heldout=conciseness_heldout)


def conciseness_heldout() -> Task:
    rows = json.loads(CONCISENESS_HELDOUT.read_text())
    return task_from_rows("conciseness-heldout", rows, conciseness_reward,
                          str(CONCISENESS_HELDOUT))


def load_python_file(path, name: str):
    """A Python file (a task file, or a script whose name holds dashes) as a module, without
    running its main()."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_rows(path) -> list:
    """Rows from a JSON list or a JSONL file, each a dict with a "prompt" key; a parse error
    names the file's line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file; give a JSON list or JSONL file of "
                                f"rows with a \"prompt\" key")
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except ValueError as error:  # its message gives the file's line and column
            raise ValueError(f"--data {path}: not a valid JSON list ({error})") from error
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                raise ValueError(f"--data {path}: line {number} is not valid JSON "
                                 f"({getattr(error, 'msg', error)}, column "
                                 f"{getattr(error, 'colno', '?')}); a JSONL file holds one JSON "
                                 f"object per line") from error
    return rows


def task_from_rows(name: str, rows, reward, source: str, task_file: str = "") -> Task:
    """A Task from rows with a "prompt" key; the other keys become columns, and every row must
    have the same ones (rows are numbered from 0)."""
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{source}: the dataset must be a non-empty list of dicts with a "
                         f"\"prompt\" key (got {type(rows).__name__})")
    bad = [i for i, row in enumerate(rows) if not isinstance(row, dict)
           or not isinstance(row.get("prompt"), str)]
    if bad:
        raise ValueError(f"{source}: row {bad[0]} has no \"prompt\" string; every row needs one "
                         f"({len(bad)} rows lack it)")
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "prompt"))
    for key in keys:
        have = [i for i, row in enumerate(rows) if key in row]
        lack = [i for i, row in enumerate(rows) if key not in row]
        if lack:
            odd = (f"row {have[0]} has the column {key!r} that {len(lack)} other rows lack "
                   f"(row {lack[0]} among them)" if len(have) * 2 < len(rows) else
                   f"row {lack[0]} lacks the column {key!r} that {len(have)} other rows have "
                   f"(row {have[0]} among them)")
            raise ValueError(f"{source}: {odd}; give every row the same keys (columns: "
                             f"{', '.join(map(repr, keys))})")
    return Task(name, [row["prompt"] for row in rows], reward,
                {k: [row[k] for row in rows] for k in keys}, source=task_file or source)


def load_task_file(path, data=None) -> Task:
    """The task a `--task PATH.py` file defines (module docstring above); `data` replaces its rows."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise FileNotFoundError(f"--task {path}: no such Python file; give a .py file defining "
                                f"reward() and DATASET or load_dataset() (see examples/)")
    module = load_python_file(path, f"es_task_{path.stem}")
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
    return task_from_rows(getattr(module, "NAME", path.stem), rows, reward, source, str(path))
