"""Deterministic generator for the Countdown data file.

Each item has 3 or 4 random numbers in 1..99 and a target obtained by
evaluating a random expression tree over all of them (random order, random
operators, random parenthesisation). Only items whose exact value is an
integer in [MIN_TARGET, MAX_TARGET] are kept. Every item is checked with the
reward function (its solution must get answer reward 1.0) before it is written.

Usage: python countdown/make_data.py [--seed 0] [--num_items 2200] [--output PATH]
The same seed always produces a byte-identical file.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from countdown.countdown_task import DEFAULT_DATA_PATH, make_prompt, reward_function  # noqa: E402

MIN_NUMBER, MAX_NUMBER = 1, 99
MIN_TARGET, MAX_TARGET = 1, 999
OPERATORS = ("+", "-", "*", "/")


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        return None
    return a / b


def random_expression(numbers: list[int], rng: random.Random) -> tuple[str, Fraction] | None:
    """Random expression using every number once; returns (text, exact value)
    or None on division by zero. Text looks like ``(44 + 19) - 35``."""
    order = list(numbers)
    rng.shuffle(order)
    # nodes: (text, value, is_atom)
    nodes: list[tuple[str, Fraction, bool]] = [(str(n), Fraction(n), True) for n in order]
    while len(nodes) > 1:
        i = rng.randrange(len(nodes) - 1)
        op = rng.choice(OPERATORS)
        (lt, lv, la), (rt, rv, ra) = nodes[i], nodes[i + 1]
        value = _apply(op, lv, rv)
        if value is None:
            return None
        left = lt if la else f"({lt})"
        right = rt if ra else f"({rt})"
        nodes[i : i + 2] = [(f"{left} {op} {right}", value, False)]
    text, value, _ = nodes[0]
    return text, value


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


def generate_items(num_items: int = 2200, seed: int = 0) -> list[dict[str, Any]]:
    """Generate ``num_items`` items. Item i depends only on the seed and the
    draws made for items < i, so a shorter run is a prefix of a longer one."""
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    while len(items) < num_items:
        k = rng.choice((3, 4))  # item size first, so 3- and 4-number items are ~50/50
        while True:  # rejection sampling until the value is an integer target in range
            numbers = [rng.randint(MIN_NUMBER, MAX_NUMBER) for _ in range(k)]
            expr = random_expression(numbers, rng)
            if expr is None:
                continue
            solution, value = expr
            if value.denominator == 1 and MIN_TARGET <= value <= MAX_TARGET:
                break
        items.append(make_item(len(items), numbers, int(value), solution))
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
