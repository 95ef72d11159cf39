"""Countdown task: prompt construction, rule-based reward and data loading.

An item is a list of 3 or 4 integers (1..99) and a target. The model must
write an arithmetic expression that uses every number exactly once with
``+ - * /`` and parentheses and evaluates to the target.

The reward for a response is ``0.1 * format_reward + answer_reward`` where

* ``format_reward`` is 1.0 for ``<think>...</think>\\n<answer>...</answer>``
  (the whole stripped text), otherwise 0.1 if a ``<think>...</think>`` pair
  occurs anywhere plus 0.5 if an ``<answer>...</answer>`` pair occurs anywhere;
* ``answer_reward`` is 1.0 if the body of the last ``<answer>`` pair is a valid
  expression over exactly the given numbers that equals the target, else 0.0.

Everything here is pure Python (no torch). Nothing is ever passed to ``eval``:
answers are parsed with :func:`ast.parse` and only integer literals, binary
``+ - * /``, unary minus and parentheses are accepted; evaluation is exact
with :class:`fractions.Fraction`. All string scanning is linear-time, so
adversarial model outputs cannot stall training.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "TRAIN_SIZE",
    "TEST_SIZE",
    "REQUIRED_FIELDS",
    "DEFAULT_DATA_PATH",
    "MAX_ANSWER_CHARS",
    "make_prompt",
    "format_reward",
    "extract_answer",
    "answer_reward",
    "reward_function",
    "countdown_reward",
    "load_countdown_data",
    "countdown_rewards",
    "make_task",
]

TRAIN_SIZE = 200
TEST_SIZE = 2000
REQUIRED_FIELDS = ("id", "context", "numbers", "target", "solution")
DEFAULT_DATA_PATH = Path(__file__).resolve().parent / "data" / "countdown.json"
MAX_ANSWER_CHARS = 1000

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_SEPARATOR = _THINK_CLOSE + "\n" + _ANSWER_OPEN

# Reference patterns (documentation / tests). The functions below implement the
# same semantics with str.find so that the cost is linear in the text length.
FULL_FORMAT_PATTERN = re.compile(r"<think>(.*?)</think>\n<answer>(.*?)</answer>", re.DOTALL)
THINK_PATTERN = re.compile(r"<think>(.*?)</think>", re.DOTALL)
ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

_ALLOWED_ANSWER_CHARS = frozenset("0123456789+-*/() \t\n\r\f\v")
_WHITESPACE_RUN = re.compile(r"[ \t\n\r\f\v]+")


# --------------------------------------------------------------------------- prompt


def _format_number(value: Any) -> str:
    """Render a number (or numeric string) without a spurious trailing '.0'."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def make_prompt(numbers: Iterable[Any], target: Any) -> str:
    """Return the prompt ("context") for one Countdown item.

    The prompt ends with an opening ``<think>`` tag; the model's response
    continues the reasoning, which is why :func:`reward_function` prepends
    ``<think>`` to the response before scoring the format.
    """
    nums = " ".join(_format_number(n) for n in numbers)
    tgt = _format_number(target)
    return (
        "Below is a conversation between a user and an assistant. The user asks a "
        "question, and the assistant first reasons about it step by step and then "
        "gives the final answer.\n"
        f"User: Using the numbers [{nums}], create an equation that equals {tgt}. "
        "You can use basic arithmetic operations (+, -, *, /), and each number must "
        "be used exactly once. Show your reasoning in <think> </think> tags and give "
        "the final equation in <answer> </answer> tags, for example "
        "<answer> (1 + 2) / 3 </answer>.\n"
        "Assistant: Let me work this out step by step.\n"
        "<think>"
    )


# --------------------------------------------------------------------------- format


def _has_pair(text: str, open_tag: str, close_tag: str) -> bool:
    """True iff ``open_tag .*? close_tag`` (DOTALL) matches somewhere; linear time.

    If the leftmost opening tag has no closing tag after it, no later opening
    tag can have one either, so one forward scan suffices.
    """
    start = text.find(open_tag)
    return start >= 0 and text.find(close_tag, start + len(open_tag)) >= 0


def format_reward(text: str) -> float:
    """Score the think/answer layout of ``text`` (response with "<think>" prepended).

    Returns 1.0 if ``text.strip()`` fully matches
    ``<think>(.*?)</think>\\n<answer>(.*?)</answer>`` (DOTALL); otherwise
    0.1 if a ``<think>...</think>`` pair occurs anywhere plus 0.5 if an
    ``<answer>...</answer>`` pair occurs anywhere. Possible values:
    0.0, 0.1, 0.5, 0.6, 1.0.
    """
    if not isinstance(text, str):
        raise TypeError(f"format_reward expects str, got {type(text).__name__}")
    s = text.strip()
    # Full match: starts with <think>, ends with </answer>, and the separator
    # "</think>\n<answer>" occurs in between (bodies are arbitrary text, so any
    # occurrence gives a match). Equivalent to FULL_FORMAT_PATTERN.fullmatch(s).
    head, tail = len(_THINK_OPEN), len(_ANSWER_CLOSE)
    if (
        len(s) >= head + len(_SEPARATOR) + tail
        and s.startswith(_THINK_OPEN)
        and s.endswith(_ANSWER_CLOSE)
        and s.find(_SEPARATOR, head, len(s) - tail) >= 0
    ):
        return 1.0
    score = 0.0
    if _has_pair(s, _THINK_OPEN, _THINK_CLOSE):
        score += 0.1
    if _has_pair(s, _ANSWER_OPEN, _ANSWER_CLOSE):
        score += 0.5
    return score


# --------------------------------------------------------------------------- answer


def extract_answer(text: str) -> str | None:
    """Body of the last ``<answer>...</answer>`` pair (as ``re.findall`` would
    find them: leftmost, non-greedy, non-overlapping), or None. Linear time."""
    if not isinstance(text, str):
        return None
    last = None
    pos = 0
    while True:
        start = text.find(_ANSWER_OPEN, pos)
        if start < 0:
            break
        body_start = start + len(_ANSWER_OPEN)
        end = text.find(_ANSWER_CLOSE, body_start)
        if end < 0:
            break
        last = text[body_start:end]
        pos = end + len(_ANSWER_CLOSE)
    return last


_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant,
                  ast.Add, ast.Sub, ast.Mult, ast.Div, ast.USub)


MAX_NESTING = 32  # parentheses or unary minuses in a row; a real answer needs a handful


def _too_deep(source: str) -> bool:
    """Deeply nested input makes the parser slow (and can exhaust its stack): refuse it up front."""
    depth = run = 0
    for ch in source.replace(" ", ""):
        depth += (ch == "(") - (ch == ")")
        run = run + 1 if ch == "-" else 0
        if depth > MAX_NESTING or run > MAX_NESTING:
            return True
    return False


def _parse_expression(body: str) -> tuple[ast.AST, list[int]] | None:
    """Parse ``body`` into a whitelisted AST; return (tree, integer literals) or None."""
    if len(body) > MAX_ANSWER_CHARS:
        return None
    if not body or any(ch not in _ALLOWED_ANSWER_CHARS for ch in body):
        return None
    source = _WHITESPACE_RUN.sub(" ", body).strip()
    if not source or _too_deep(source):
        return None
    tree = ast.parse(source, mode="eval")
    literals: list[int] = []
    for node in ast.walk(tree):  # iterative, no recursion
        if not isinstance(node, _ALLOWED_NODES):
            return None
        if isinstance(node, ast.Constant):
            if type(node.value) is not int:
                return None
            literals.append(node.value)
    return tree, literals


def _evaluate(tree: ast.Expression) -> Fraction | None:
    """Exact, iterative (explicit stack) evaluation of a whitelisted AST.

    Returns None on division by zero.
    """
    values: list[Fraction] = []
    stack: list[tuple[ast.AST, bool]] = [(tree.body, False)]
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, ast.Constant):
            values.append(Fraction(node.value))
        elif isinstance(node, ast.UnaryOp):
            if children_done:
                values.append(-values.pop())
            else:
                stack.append((node, True))
                stack.append((node.operand, False))
        elif isinstance(node, ast.BinOp):
            if children_done:
                right = values.pop()
                left = values.pop()
                op = node.op
                if isinstance(op, ast.Add):
                    values.append(left + right)
                elif isinstance(op, ast.Sub):
                    values.append(left - right)
                elif isinstance(op, ast.Mult):
                    values.append(left * right)
                else:  # ast.Div (whitelisted)
                    if right == 0:
                        return None
                    values.append(left / right)
            else:
                stack.append((node, True))
                stack.append((node.right, False))
                stack.append((node.left, False))
        else:  # cannot happen after whitelisting
            raise ValueError(f"unexpected node {type(node).__name__}")
    return values[0]


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("bool is not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise ValueError(f"not an integer: {value!r}")


def answer_reward(text: str, numbers: Iterable[Any], target: Any) -> float:
    """1.0 if the last answer body uses exactly ``numbers`` (as a multiset) and
    evaluates to ``target`` (within 1e-5), else 0.0. Never raises."""
    try:
        body = extract_answer(text)
        if body is None:
            return 0.0
        target_value = float(target)
        if not math.isfinite(target_value):
            return 0.0
        parsed = _parse_expression(body)
        if parsed is None:
            return 0.0
        tree, literals = parsed
        if Counter(literals) != Counter(_as_int(n) for n in numbers):
            return 0.0
        value = _evaluate(tree)
        if value is None:
            return 0.0
        return 1.0 if abs(value - Fraction(target_value)) < Fraction(1, 100_000) else 0.0
    except Exception:  # SyntaxError, RecursionError, ValueError, MemoryError, ...
        return 0.0


# --------------------------------------------------------------------------- total


def reward_function(response: str, numbers: Iterable[Any], target: Any) -> dict[str, float]:
    """Score a model response (the text generated after the prompt's "<think>").

    Returns ``{"reward": 0.1 * format + answer, "format_reward": ...,
    "answer_reward": ...}``.
    """
    if not isinstance(response, str):
        raise TypeError(f"reward_function expects a str response, got {type(response).__name__}")
    text = _THINK_OPEN + response
    fmt = format_reward(text)
    ans = answer_reward(text, list(numbers), target)
    return {"reward": 0.1 * fmt + ans, "format_reward": fmt, "answer_reward": ans}


def countdown_reward(response: str, item: Mapping[str, Any]) -> float:
    """Total reward of ``response`` for an item dict with keys ``numbers`` and ``target``."""
    return reward_function(response, item["numbers"], item["target"])["reward"]


# --------------------------------------------------------------------------- data

_REGENERATE_HINT = "regenerate it with `python countdown/make_data.py`"


def _schema_error(path: Path, what: str) -> ValueError:
    return ValueError(
        f"Countdown data file {path}: {what}. Expected a JSON list of objects with "
        f"fields {', '.join(REQUIRED_FIELDS)}; {_REGENERATE_HINT}."
    )


def load_countdown_data(
    path: str | Path | None = None,
    data_sample: int | None = None,
    split: str = "train",
) -> list[dict[str, Any]]:
    """Load and validate the Countdown data file.

    ``split``: "train" = first TRAIN_SIZE items, "test" = last TEST_SIZE items,
    "all" = every item. ``data_sample`` keeps the first N items of the split.
    """
    path = Path(DEFAULT_DATA_PATH if path is None else path)
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if data_sample is not None and (isinstance(data_sample, bool) or not isinstance(data_sample, int)):
        raise ValueError(f"data_sample must be a positive int or None, got {data_sample!r}")
    if data_sample is not None and data_sample < 1:
        raise ValueError(f"data_sample must be >= 1, got {data_sample}")
    if not path.is_file():
        raise FileNotFoundError(
            f"Countdown data file not found: {path}. Expected a JSON list of objects with "
            f"fields {', '.join(REQUIRED_FIELDS)}; {_REGENERATE_HINT}."
        )
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _schema_error(path, f"malformed JSON ({e})") from e
    if not isinstance(items, list) or not items:
        raise _schema_error(path, "top level is not a non-empty JSON list")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _schema_error(path, f"item {i} is not an object")
        missing = [k for k in REQUIRED_FIELDS if k not in item]
        if missing:
            raise _schema_error(path, f"item {i} is missing field(s) {', '.join(missing)}")
        if not isinstance(item["context"], str) or not isinstance(item["numbers"], list) \
                or not item["numbers"]:
            raise _schema_error(path, f"item {i} has a non-string context or empty/non-list numbers")

    if split == "all":
        selected = items
    else:
        if len(items) < TRAIN_SIZE + TEST_SIZE:
            raise _schema_error(
                path,
                f"only {len(items)} items, but the train/test splits need at least "
                f"{TRAIN_SIZE + TEST_SIZE} (train = first {TRAIN_SIZE}, test = last {TEST_SIZE}) "
                "so that they do not overlap; use split='all' for small files",
            )
        selected = items[:TRAIN_SIZE] if split == "train" else items[-TEST_SIZE:]

    if data_sample is not None:
        if data_sample > len(selected):
            raise ValueError(
                f"data_sample={data_sample} is larger than the {split!r} split of {path}, "
                f"which has {len(selected)} items"
            )
        selected = selected[:data_sample]
    return selected


def countdown_rewards(prompts, completions, numbers, target, **_) -> list:
    """TRL-style reward function: the total Countdown reward of each completion."""
    return [reward_function(c, n, t)["reward"] for c, n, t in zip(completions, numbers, target)]


def make_task(data_sample=None, path=None, split="train"):
    """The Countdown task (prompts, numbers, targets and reward) for a trainer or an evaluation."""
    from es_llm.tasks import Task

    items = load_countdown_data(path, data_sample=data_sample, split=split)
    return Task("countdown", [item["context"] for item in items], countdown_rewards,
                {"numbers": [item["numbers"] for item in items],
                 "target": [item["target"] for item in items]})
