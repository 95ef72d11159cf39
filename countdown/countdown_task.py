"""Countdown task: prompt construction, rule-based reward and data loading.

An item is a list of 3 or 4 integers (1..99) and an integer target (1..100). The model must write an
arithmetic expression that uses every number exactly once with ``+ - * /`` and parentheses and
evaluates to the target.

Everything here follows the published rules by default (MISSION.md section 3):

* the prompt is the TinyZero Countdown context, character for character, with no chat template
  (:func:`make_prompt`);
* the reward of a response is ``0.1 * format + answer`` (:func:`reward_function`), where ``format``
  is scored on ``"<think>" + response`` and ``answer`` on the response:

  - ``format`` = 1.0 if the text matches ``^<think>.*?</think>\\n<answer>.*?</answer>$`` (``re.match``,
    DOTALL: one final newline is allowed, nothing is stripped), otherwise 0.1 if
    ``<think>.*?</think>`` occurs plus 0.5 if ``<answer>.*?</answer>`` occurs;
  - ``answer`` = 1.0 if the last ``<answer>(.*?)</answer>`` body is non-empty, matches
    ``^[0-9+\\-*/() ]+$`` (``re.match``), its digit runs are exactly the item's numbers (a
    multiset), and the body read as Python reads it with ``eval`` equals the target within 1e-5
    (``abs(value - float(target)) < 1e-5``); any error scores 0;

* when the decoded prompt + response is scored (``REWARD_ON_PROMPT_AND_RESPONSE = True``, as the
  published HF scripts do), a text containing ``"assistant:"`` is cut to what follows its last
  occurrence, stripped (:func:`published_text_to_score`, :func:`full_text_reward`).

``eval`` is never called. The answer body is parsed with :func:`ast.parse` (after dropping leading
spaces and tabs, as ``eval`` does) and the tree is evaluated with Python's own operators on Python
ints and floats, which is what ``eval`` computes: ``**`` is power, ``//`` floor division, ``/`` true
division, unary ``+``/``-`` are allowed; a call such as ``(2)(3)``, the empty tuple ``()``, syntax
errors, division by zero and results too large for a float score 0. The one deliberate difference:
an integer power whose result would pass ``2**1100`` in magnitude scores 0 at once, without being
computed (``eval`` computes it, and never finishes on ``9**9**9**9``). All string scanning is
linear-time, so adversarial model outputs cannot stall training.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "TRAIN_SIZE",
    "TEST_SIZE",
    "REQUIRED_FIELDS",
    "DEFAULT_DATA_PATH",
    "PROMPT_TEMPLATE",
    "ASSISTANT_MARKER",
    "MAX_POWER",
    "make_prompt",
    "format_reward",
    "extract_answer",
    "evaluate_expression",
    "answer_reward",
    "reward_function",
    "published_text_to_score",
    "full_text_reward",
    "load_countdown_data",
    "countdown_rewards",
    "make_task",
]

TRAIN_SIZE = 200
TEST_SIZE = 2000
REQUIRED_FIELDS = ("id", "context", "numbers", "target", "solution")
DEFAULT_DATA_PATH = Path(__file__).resolve().parent / "data" / "countdown.json"

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_SEPARATOR = _THINK_CLOSE + "\n" + _ANSWER_OPEN

# The published patterns (documentation / tests). format_reward and extract_answer implement the
# same semantics with str.find so that the cost is linear in the text length.
FULL_FORMAT_PATTERN = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)
THINK_PATTERN = re.compile(r"<think>.*?</think>", re.DOTALL)
ANSWER_PATTERN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Used as published (re.match): linear, since only position 0 is tried.
ANSWER_CHARS_PATTERN = re.compile(r"^[0-9+\-*/() ]+$")
_DIGIT_RUN = re.compile(r"\d+")

ASSISTANT_MARKER = "assistant:"
MAX_POWER = 2 ** 1100  # an integer power beyond this magnitude scores 0 without being computed


# --------------------------------------------------------------------------- prompt

PROMPT_TEMPLATE = (
    "You are a helpful assistant. You first think about the reasoning process in your mind and "
    "then provide the user with the answer.Using the numbers [{numbers}], create an equation that "
    "equals {target}. You can use basic arithmetic operations (+, -, *, /) and each number can only "
    "be used once. Show your work in <think> </think> tags. And return the final answer in "
    "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.Let me solve this step "
    "by step.\n<think>"
)


def _format_number(value: Any) -> str:
    """Render a number (or numeric string) without a spurious trailing '.0'."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def make_prompt(numbers: Iterable[Any], target: Any) -> str:
    """Return the prompt ("context") for one Countdown item: the published TinyZero template.

    The prompt ends with an opening ``<think>`` tag; the model's response continues the reasoning,
    which is why :func:`reward_function` prepends ``<think>`` to the response before scoring the
    format.
    """
    return PROMPT_TEMPLATE.format(numbers=" ".join(_format_number(n) for n in numbers),
                                  target=_format_number(target))


# --------------------------------------------------------------------------- format


def _has_pair(text: str, open_tag: str, close_tag: str) -> bool:
    """True iff ``open_tag .*? close_tag`` (DOTALL) matches somewhere; linear time.

    If the leftmost opening tag has no closing tag after it, no later opening tag can have one
    either, so one forward scan suffices.
    """
    start = text.find(open_tag)
    return start >= 0 and text.find(close_tag, start + len(open_tag)) >= 0


def format_reward(text: str) -> float:
    """Score the think/answer layout of ``text`` (the response with "<think>" prepended).

    1.0 if ``re.match(r"^<think>.*?</think>\\n<answer>.*?</answer>$", text, re.DOTALL)``; otherwise
    0.1 if a ``<think>...</think>`` pair occurs anywhere plus 0.5 if an ``<answer>...</answer>``
    pair occurs anywhere. Possible values: 0.0, 0.1, 0.5, 0.6, 1.0. Nothing is stripped.
    """
    if not isinstance(text, str):
        raise TypeError(f"format_reward expects str, got {type(text).__name__}")
    # `$` matches at the very end or just before one final newline; the text cannot end with both
    # "</answer>" and "\n", so only the text without that newline can match.
    s = text[:-1] if text.endswith("\n") else text
    # The bodies are arbitrary (DOTALL), so the pattern matches iff s starts with <think>, ends with
    # </answer>, and "</think>\n<answer>" occurs in between without overlapping either tag.
    head, tail = len(_THINK_OPEN), len(_ANSWER_CLOSE)
    if (
        len(s) >= head + len(_SEPARATOR) + tail
        and s.startswith(_THINK_OPEN)
        and s.endswith(_ANSWER_CLOSE)
        and s.find(_SEPARATOR, head, len(s) - tail) >= 0
    ):
        return 1.0
    score = 0.0
    if _has_pair(text, _THINK_OPEN, _THINK_CLOSE):
        score += 0.1
    if _has_pair(text, _ANSWER_OPEN, _ANSWER_CLOSE):
        score += 0.5
    return score


# --------------------------------------------------------------------------- answer


def extract_answer(text: str) -> str | None:
    """Body of the last ``<answer>...</answer>`` pair (as ``re.findall`` would find them: leftmost,
    non-greedy, non-overlapping), or None. Linear time."""
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


class _NotScored(Exception):
    """The expression scores 0: eval would raise, or never finish, on it."""


def _power(base, exponent):
    """``base ** exponent`` as Python computes it, except that an integer power whose magnitude
    would pass MAX_POWER raises _NotScored before anything is computed."""
    if type(base) is int and type(exponent) is int and exponent > 0 and abs(base) > 1:
        low_bits = base.bit_length() - 1  # |base| >= 2 ** low_bits
        if exponent * low_bits > MAX_POWER.bit_length() - 1:
            raise _NotScored("power too large")
        # here the result has at most exponent * bit_length <= 2 * 1100 bits: cheap
        result = base ** exponent
        if abs(result) > MAX_POWER:
            raise _NotScored("power too large")
        return result
    return base ** exponent  # |base| <= 1, exponent <= 0, or a float: O(1) (or OverflowError)


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: _power}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate_expression(body: str):
    """The value ``eval(body)`` would return, for a body of the published answer characters, or
    raise (SyntaxError, ZeroDivisionError, OverflowError, RecursionError, MemoryError, ...).

    Raises _NotScored for what can only score 0 (a call, a tuple, anything but integer literals
    and the arithmetic operators) and for a power beyond MAX_POWER. Never calls ``eval``; the tree
    is walked with an explicit stack, so its depth costs no Python recursion.
    """
    tree = ast.parse(body.lstrip(" \t"), mode="eval")  # eval drops leading spaces and tabs
    values: list = []
    stack: list[tuple[ast.AST, bool]] = [(tree.body, False)]
    while stack:
        node, children_done = stack.pop()
        if isinstance(node, ast.Constant) and type(node.value) is int:
            values.append(node.value)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            if children_done:
                values.append(_UNARY[type(node.op)](values.pop()))
            else:
                stack.append((node, True))
                stack.append((node.operand, False))
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            if children_done:
                right = values.pop()
                left = values.pop()
                values.append(_BINARY[type(node.op)](left, right))
            else:
                stack.append((node, True))
                stack.append((node.right, False))
                stack.append((node.left, False))
        else:
            # Within the answer characters: a call like (2)(3) (ints are not callable), the empty
            # tuple () (a tuple can never turn back into a number), starred or keyword arguments.
            raise _NotScored(f"{type(node).__name__} cannot score")
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
    """1.0 if the last answer body in ``text`` is made of the published answer characters, uses
    exactly ``numbers`` (as a multiset) and evaluates (as ``eval`` would) to ``target`` within
    1e-5, else 0.0. Never raises."""
    try:
        body = extract_answer(text)
        if not body or not ANSWER_CHARS_PATTERN.match(body):
            return 0.0
        used = Counter(int(run) for run in _DIGIT_RUN.findall(body))
        if not used or used != Counter(_as_int(n) for n in numbers):
            return 0.0  # without digits only tuples can be built: never a number
        value = evaluate_expression(body)
        return 1.0 if abs(value - float(target)) < 1e-5 else 0.0
    except Exception:  # SyntaxError, ZeroDivisionError, OverflowError, RecursionError, ...
        return 0.0


# --------------------------------------------------------------------------- total


def reward_function(response: str, numbers: Iterable[Any], target: Any) -> dict[str, float]:
    """Score a model response (the text generated after the prompt's "<think>").

    Returns ``{"reward": 0.1 * format + answer, "format_reward": ..., "answer_reward": ...}``, the
    format scored on ``"<think>" + response`` and the answer on the response.
    """
    if not isinstance(response, str):
        raise TypeError(f"reward_function expects a str response, got {type(response).__name__}")
    fmt = format_reward(_THINK_OPEN + response)
    ans = answer_reward(response, numbers, target)
    return {"reward": 0.1 * fmt + ans, "format_reward": fmt, "answer_reward": ans}


def published_text_to_score(full_text: str) -> str:
    """What the published HF scripts score of a decoded prompt + response: the text after the last
    ``"assistant:"``, stripped, when it contains one; otherwise the text unchanged."""
    if ASSISTANT_MARKER in full_text:
        return full_text.rpartition(ASSISTANT_MARKER)[2].strip()
    return full_text


def full_text_reward(full_text: str, numbers: Iterable[Any], target: Any) -> dict[str, float]:
    """:func:`reward_function` of a decoded prompt + response, as the published HF scripts score it
    (``REWARD_ON_PROMPT_AND_RESPONSE = True``): with this repository's prompt the prompt's own tags
    give every item format 0.6 at least, a free 0.06."""
    return reward_function(published_text_to_score(full_text), numbers, target)


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
    """TRL-style reward function: the total Countdown reward of each completion.

    A completion is the response alone, or, when the trainer scores the decoded prompt + response
    (``REWARD_ON_PROMPT_AND_RESPONSE = True``), a text that starts with its prompt: that one is
    scored as the published HF scripts score it (:func:`full_text_reward`)."""
    rewards = []
    for prompt, completion, nums, tgt in zip(prompts, completions, numbers, target):
        with_prompt = isinstance(prompt, str) and prompt and completion.startswith(prompt)
        score = full_text_reward if with_prompt else reward_function
        rewards.append(score(completion, nums, tgt)["reward"])
    return rewards


def make_task(data_sample=None, path=None, split="train"):
    """The Countdown task (prompts, numbers, targets and reward) for a trainer or an evaluation."""
    from es_llm.tasks import Task

    items = load_countdown_data(path, data_sample=data_sample, split=split)
    heldout = partial(make_task, path=path, split="test") if split == "train" else None
    return Task("countdown", [item["context"] for item in items], countdown_rewards,
                {"numbers": [item["numbers"] for item in items],
                 "target": [item["target"] for item in items]}, heldout=heldout)
