"""Deterministic generator for the Countdown data file.

The published distribution: each item has 3 or 4 numbers (about half the items each, the size drawn
first), every number drawn uniformly from 1..99 (repeats allowed), and an integer target drawn
uniformly from 1..100. A draw is kept only if it is solvable: some expression using every number
exactly once with ``+ - * /`` and parentheses equals the target exactly (:func:`solve`, an exhaustive
search: a vectorised floating-point check first, then a goal-directed search whose candidate is
confirmed in exact rational arithmetic). That expression becomes the item's solution, and every item
is checked with the reward code (its solution must get answer reward 1.0) before it is written.
So the items of each size are uniform over the solvable (numbers, target) draws.

Usage: python countdown/make_data.py [--seed 0] [--num_items 2200] [--output PATH]
The same seed always produces a byte-identical file.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from countdown.countdown_task import DEFAULT_DATA_PATH, make_prompt, reward_function  # noqa: E402

MIN_NUMBER, MAX_NUMBER = 1, 99
MIN_TARGET, MAX_TARGET = 1, 100
SIZES = (3, 4)


def _wrap(text: str, atom: bool) -> str:
    return text if atom else f"({text})"


def _splits(indices: tuple[int, ...]):
    """Every way of cutting ``indices`` into two non-empty parts, each unordered pair once, the
    smaller part first."""
    first, rest = indices[0], indices[1:]
    for mask in range(2 ** len(rest) - 1):  # the part holding `first` never takes all the rest
        part = (first,) + tuple(x for bit, x in enumerate(rest) if mask >> bit & 1)
        other = tuple(x for bit, x in enumerate(rest) if not mask >> bit & 1)
        yield (part, other) if len(part) <= len(other) else (other, part)


def _close(value: float, goal: float) -> bool:
    return abs(value - goal) <= 1e-9 * max(1.0, abs(goal))


def _values(indices, numbers) -> list[tuple[float, str, bool]]:
    """Every (value, expression text, is a literal) over one or two numbers."""
    if len(indices) == 1:
        n = numbers[indices[0]]
        return [(float(n), str(n), True)]
    (a, ta, _), (b, tb, _) = _values(indices[:1], numbers)[0], _values(indices[1:], numbers)[0]
    out = [(a + b, f"{ta} + {tb}", False), (a * b, f"{ta} * {tb}", False),
           (a - b, f"{ta} - {tb}", False), (b - a, f"{tb} - {ta}", False)]
    if b:
        out.append((a / b, f"{ta} / {tb}", False))
    if a:
        out.append((b / a, f"{tb} / {ta}", False))
    return out


def _candidates(indices, numbers, goal: float):
    """Expressions (text, is a literal) over ``numbers[i] for i in indices``, each used once, whose
    floating-point value is within a relative 1e-9 of ``goal``: every exact solution is among them
    (for positive numbers and a non-zero top-level goal). Goal-directed: the last operator is
    fixed by one operand and the goal, so the other operand is searched for with a new goal."""
    if len(indices) <= 2:
        for value, text, atom in _values(indices, numbers):
            if _close(value, goal):
                yield text, atom
        return
    for small, large in _splits(indices):
        for a, ta, aa in _values(small, numbers):
            a_text = _wrap(ta, aa)
            needs = [(goal - a, "{a} + {b}"), (a - goal, "{a} - {b}"), (goal + a, "{b} - {a}")]
            if a:  # a zero operand cannot help reach a non-zero goal by * or /
                needs += [(goal / a, "{a} * {b}"), (goal * a, "{b} / {a}")]
                if goal:
                    needs.append((a / goal, "{a} / {b}"))
            for need, form in needs:
                for tb, ab in _candidates(large, numbers, need):
                    yield form.format(a=a_text, b=_wrap(tb, ab)), False


_EXACT_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
              ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def exact_value(expression: str) -> Fraction:
    """The exact rational value of an expression of integers, + - * / and parentheses."""
    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _EXACT_OPS:
            return _EXACT_OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"not a Countdown expression: {expression!r}")
    return walk(ast.parse(expression, mode="eval").body)


def solve(numbers: list[int], target: int) -> str | None:
    """An expression using every number exactly once with + - * / and parentheses that equals
    ``target`` exactly, or None if there is none. Exhaustive for positive numbers and a non-zero
    target: candidates are found in floating point, and the first exactly right one is returned."""
    for text, _ in _candidates(tuple(range(len(numbers))), list(numbers), float(target)):
        try:
            if exact_value(text) == target:
                return text
        except ZeroDivisionError:  # an exact zero that floating point missed
            continue
    return None


def make_item(index: int, numbers: list[int], target: int, solution: str) -> dict[str, Any]:
    target_str = str(target)
    item = {
        "id": index,
        "context": make_prompt(numbers, target_str),
        "numbers": list(numbers),
        "target": target_str,
        "solution": solution,
    }
    check = reward_function(f" reasoning </think>\n<answer>{solution}</answer>", numbers, target_str)
    if check["answer_reward"] != 1.0 or check["format_reward"] != 1.0:
        raise RuntimeError(f"generated item {index} does not verify: {item!r} -> {check!r}")
    return item


def _all_values(numbers: np.ndarray) -> np.ndarray:
    """Floating-point values of every expression over each row's numbers (each used once, any
    order, + - * /): shape (rows, expressions); a division by zero gives inf or nan."""
    memo: dict = {}

    def values(indices):
        if indices not in memo:
            if len(indices) == 1:
                memo[indices] = numbers[:, indices[0]:indices[0] + 1]
            else:
                parts = []
                for small, large in _splits(indices):
                    a = values(small)[:, :, None]
                    b = values(large)[:, None, :]
                    parts += [a + b, a * b, a - b, b - a, a / b, b / a]
                memo[indices] = np.concatenate([p.reshape(len(numbers), -1) for p in parts], axis=1)
        return memo[indices]

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return values(tuple(range(numbers.shape[1])))


def maybe_solvable(draws: list[list[int]]) -> list[bool]:
    """For rows ``numbers + [target]``: False only where no expression reaches the target (a
    floating-point check with a relative tolerance of 1e-9, so no exact solution is missed)."""
    rows = np.asarray(draws, dtype=np.float64)
    targets = rows[:, -1:]
    with np.errstate(invalid="ignore"):
        close = np.abs(_all_values(rows[:, :-1]) - targets) <= 1e-9 * np.maximum(1.0, np.abs(targets))
    return close.any(axis=1).tolist()


class _SolvableDraws:
    """The solvable draws of one size, in order: draws ``numbers`` (k numbers in 1..99) then a
    target (1..100) from its own random stream, and keeps those that :func:`solve` solves."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.rng = random.Random(f"countdown-{seed}-{size}")  # str seeds are stable (sha512)
        self.pending: deque = deque()

    def __next__(self) -> tuple[list[int], int, str]:
        while True:
            while not self.pending:  # draw a batch; the float check weeds out most of it at once
                draws = [[self.rng.randint(MIN_NUMBER, MAX_NUMBER) for _ in range(self.size)]
                         + [self.rng.randint(MIN_TARGET, MAX_TARGET)] for _ in range(_BATCH)]
                self.pending.extend(d for d, ok in zip(draws, maybe_solvable(draws)) if ok)
            draw = self.pending.popleft()
            numbers, target = draw[:-1], draw[-1]
            solution = solve(numbers, target)
            if solution is not None:
                return numbers, target, solution


_BATCH = 512  # draws checked at once; the items do not depend on it


def generate_items(num_items: int = 2200, seed: int = 0) -> list[dict[str, Any]]:
    """Generate ``num_items`` items. The size of each item comes from one random stream; the items
    of each size are the solvable draws of that size's own stream, in order. So a shorter run is a
    prefix of a longer one, and the items are uniform over the solvable draws of their size."""
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    sizes = random.Random(f"countdown-{seed}-sizes")
    streams = {k: _SolvableDraws(k, seed) for k in SIZES}
    items: list[dict[str, Any]] = []
    while len(items) < num_items:
        numbers, target, solution = next(streams[sizes.choice(SIZES)])
        items.append(make_item(len(items), numbers, target, solution))
    return items


def write_items(items: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(items, f, indent=1, ensure_ascii=True)
        f.write("\n")
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_items", type=int, default=2200)
    parser.add_argument("--output", type=Path, default=DEFAULT_DATA_PATH)
    args = parser.parse_args(argv)
    items = generate_items(args.num_items, args.seed)
    path = write_items(items, args.output)
    print(f"wrote {len(items)} items to {path}")
    return path


if __name__ == "__main__":
    main()
