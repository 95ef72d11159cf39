"""Tests for the Countdown prompt and reward (countdown/countdown_task.py).

The reward must be the published one (MISSION.md section 3) without calling eval: the answer part is
compared with a reference that applies the published rules with the real `eval` on expressions that
are safe to evaluate (no power towers).
"""

import ast
import gc
import re
import time
import warnings

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from countdown.countdown_task import (
    ANSWER_PATTERN,
    FULL_FORMAT_PATTERN,
    MAX_POWER,
    THINK_PATTERN,
    answer_reward,
    countdown_rewards,
    evaluate_expression,
    extract_answer,
    format_reward,
    full_text_reward,
    make_prompt,
    published_text_to_score,
    reward_function,
)

NUMS = [44, 19, 35]
TARGET = 28  # 44 + 19 - 35
GOOD = " 44 + 19 = 63, 63 - 35 = 28 </think>\n<answer>(44 + 19) - 35</answer>"
FORMAT_VALUES = {0.0, 0.1, 0.5, 0.6, 1.0}

PUBLISHED_PROMPT_44_19_35_98 = (
    "You are a helpful assistant. You first think about the reasoning process in your mind and then "
    "provide the user with the answer.Using the numbers [44 19 35], create an equation that equals 98. "
    "You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. Show "
    "your work in <think> </think> tags. And return the final answer in <answer> </answer> tags, for "
    "example <answer> (1 + 2) / 3 </answer>.Let me solve this step by step.\n<think>"
)


def _answer(body):
    return f"<think>x</think>\n<answer>{body}</answer>"


def _digits(body):
    return [int(d) for d in re.findall(r"\d+", body)]


def _timed(fn, *args):
    """The result and the least CPU time of three calls (a loaded machine must not fail the bound),
    with the garbage collector off: collecting what earlier tests left must not either."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(3):
            t0 = time.thread_time()
            out = fn(*args)
            times.append(time.thread_time() - t0)
    finally:
        if enabled:
            gc.enable()
    return out, min(times)


# ------------------------------------------------------------------ the published rules, with eval


def _eval(body):
    with warnings.catch_warnings():  # "(2)(3)" makes the compiler warn that an int is not callable
        warnings.simplefilter("ignore")
        return eval(body, {"__builtins__": {}}, {})  # noqa: S307 - the reference, on safe bodies


def published_answer_reward(response, numbers, target):
    """The published answer rule, written from the spec, with the real eval (test reference only)."""
    bodies = re.findall(r"<answer>(.*?)</answer>", response, re.DOTALL)
    if not bodies or not bodies[-1]:
        return 0.0
    body = bodies[-1]
    if not re.match(r"^[0-9+\-*/() ]+$", body):
        return 0.0
    if sorted(int(d) for d in re.findall(r"\d+", body)) != sorted(numbers):
        return 0.0
    try:
        return 1.0 if abs(_eval(body) - float(target)) < 1e-5 else 0.0
    except Exception:
        return 0.0


def published_format_reward(text):
    if re.match(r"^<think>.*?</think>\n<answer>.*?</answer>$", text, re.DOTALL):
        return 1.0
    return ((0.1 if re.search(r"<think>.*?</think>", text, re.DOTALL) else 0.0)
            + (0.5 if re.search(r"<answer>.*?</answer>", text, re.DOTALL) else 0.0))


def _has_power_beyond_limit(body):
    """Whether evaluating `body` computes an integer power above MAX_POWER (the one documented
    difference from eval). Only for bodies whose powers eval computes quickly."""
    try:
        tree = ast.parse(body.lstrip(" \t"), mode="eval")
    except Exception:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            try:
                value = _eval(ast.unparse(node))
            except Exception:
                continue
            if isinstance(value, int) and abs(value) > MAX_POWER:
                return True
    return False


# ------------------------------------------------------------------ prompt


def test_prompt_is_the_published_context_character_for_character():
    assert make_prompt([44, 19, 35], 98) == PUBLISHED_PROMPT_44_19_35_98
    assert make_prompt([44, 19, 35], "98") == PUBLISHED_PROMPT_44_19_35_98
    assert make_prompt([1, 2, 3, 4], 10.0) == make_prompt([1, 2, 3, 4], "10")
    assert "[1 2 3 4]" in make_prompt([1, 2, 3, 4], 10)


# ------------------------------------------------------------------ total and format


def test_correct_answer_scores_1_1():
    r = reward_function(GOOD, NUMS, TARGET)
    assert r == {"reward": pytest.approx(1.1), "format_reward": 1.0, "answer_reward": 1.0}
    assert reward_function(GOOD, NUMS, "28")["reward"] == pytest.approx(1.1)  # a string target


def test_reward_is_point_one_format_plus_answer():
    r = reward_function(" hmm </think>\n<answer>44 + 19 + 35</answer>", NUMS, TARGET)
    assert r == {"reward": pytest.approx(0.1), "format_reward": 1.0, "answer_reward": 0.0}
    r = reward_function(" <answer>44 + 19 - 35</answer>", NUMS, TARGET)  # no </think>
    assert r["format_reward"] == 0.5 and r["answer_reward"] == 1.0
    assert r["reward"] == pytest.approx(1.05)


def test_format_levels_follow_re_match_without_stripping():
    assert format_reward("<think>a</think>\n<answer>b</answer>") == 1.0
    assert format_reward("<think>a</think>\n<answer>b</answer>\n") == 1.0  # `$`: one final newline
    assert format_reward("<think>a</think>\n<answer>b</answer>\n\n") == 0.6
    assert format_reward("<think>a</think>\n<answer>b</answer> ") == 0.6  # a trailing space is text
    assert format_reward(" <think>a</think>\n<answer>b</answer>") == 0.6  # nothing is stripped
    assert format_reward("<think></think>\n<answer></answer>") == 1.0  # empty bodies
    assert format_reward("<think>a\nb</think>\n<answer>c\nd</answer>") == 1.0  # DOTALL
    assert format_reward("<think>a</think>\n<answer>b</answer>x</think>\n<answer>c</answer>") == 1.0
    assert format_reward("<think>a</think> <answer>b</answer>") == 0.6  # space, not \n
    assert format_reward("<think>a</think>\n<answer>b</answer> trailing") == 0.6
    assert format_reward("<think>a</think> nothing else") == 0.1
    assert format_reward("<answer>b</answer>") == 0.5
    assert format_reward("no tags at all") == 0.0
    assert format_reward("<think>a <answer>b") == 0.0  # unclosed
    assert format_reward("</think>a<think> </answer>b<answer>") == 0.0  # wrong order
    for text in ["<think>a</think>\n<answer>b</answer>\n", "<think>a</think>\n<answer>b</answer> ",
                 " <think>a</think>\n<answer>b</answer>"]:
        assert format_reward(text) == published_format_reward(text)


def test_reward_function_prepends_think():
    assert reward_function(" r </think>\n<answer>1</answer>", [1], 1)["format_reward"] == 1.0
    assert reward_function(" r </think>\n<answer>1</answer>\n", [1], 1)["format_reward"] == 1.0
    assert reward_function(" r </think>\n<answer>1</answer> ", [1], 1)["format_reward"] == 0.6
    assert reward_function("just text", [1], 1)["format_reward"] == 0.0
    assert reward_function("</think>", [1], 1)["format_reward"] == 0.1


# ------------------------------------------------------------------ answer: extraction and numbers


def test_last_answer_counts():
    text = "<think>t</think>\n<answer>44 + 19 + 35</answer> no wait <answer>44 + 19 - 35</answer>"
    assert extract_answer(text) == "44 + 19 - 35"
    assert answer_reward(text, NUMS, TARGET) == 1.0
    text = "<think>t</think>\n<answer>44 + 19 - 35</answer> no wait <answer>44 - 19 + 35</answer>"
    assert answer_reward(text, NUMS, TARGET) == 0.0
    # the last complete pair counts, even when it is empty or garbage
    assert answer_reward("<answer>44 + 19 - 35</answer><answer></answer>", NUMS, TARGET) == 0.0
    assert answer_reward("<answer>44 + 19 - 35</answer><answer>x</answer>", NUMS, TARGET) == 0.0
    # an unclosed trailing <answer> does not replace the last complete pair
    assert extract_answer("<answer>1</answer><answer>2") == "1"
    assert extract_answer("no answer") is None
    assert answer_reward("no answer", NUMS, TARGET) == 0.0


def test_extract_answer_matches_findall_semantics():
    for text in ["<answer>a</answer><answer>b</answer>", "<answer><answer>x</answer>",
                 "<answer>a</answer></answer>", "<answer></answer>",
                 "<answer>a<answer>b</answer>c</answer>"]:
        found = ANSWER_PATTERN.findall(text)
        assert extract_answer(text) == (found[-1] if found else None)


def test_wrong_multiset_scores_zero():
    assert answer_reward(_answer("44 + 19 - 35"), NUMS, TARGET) == 1.0
    assert answer_reward(_answer("44 + 19 - 35 + 0"), NUMS, TARGET) == 0.0  # extra literal
    assert answer_reward(_answer("44 + 19 - 35 + 35 - 35"), NUMS, TARGET) == 0.0  # reuse
    assert answer_reward(_answer("44 - 16"), NUMS, TARGET) == 0.0  # missing numbers
    assert answer_reward(_answer("63 - 35"), NUMS, TARGET) == 0.0  # merged literal
    assert answer_reward(_answer("5 * 5 - 1"), [5, 5, 1], 24) == 1.0  # duplicates count
    assert answer_reward(_answer("5 * 5 - 1"), [5, 1, 1], 24) == 0.0
    assert answer_reward(_answer("5 * 5 - 1"), [5, 1], 24) == 0.0


# ------------------------------------------------------------------ answer: as eval reads it


@pytest.mark.parametrize("body, numbers, target, expected", [
    # whitespace: only spaces pass the character filter, plus one final newline (`$`)
    (" ( 44 + 19 ) - 35 ", NUMS, TARGET, 1.0),            # leading and trailing spaces
    ("44 + 19 - 35\n", NUMS, TARGET, 1.0),                # one final newline
    ("44 + 19 - 35\n\n", NUMS, TARGET, 0.0),
    ("\n44 + 19 - 35", NUMS, TARGET, 0.0),                # a leading newline fails the filter
    ("44 +\n19 - 35", NUMS, TARGET, 0.0),
    ("44\t+ 19 - 35", NUMS, TARGET, 0.0),                 # a tab fails the filter
    ("\t44 + 19 - 35", NUMS, TARGET, 0.0),
    ("", NUMS, TARGET, 0.0),                               # empty body
    ("   ", NUMS, TARGET, 0.0),
    ("1 2", [1, 2], 12, 0.0),                              # syntax error
    ("44 + 19 - 35 = 28", NUMS, TARGET, 0.0),             # '=' fails the filter
    # Python's operators
    ("2**3", [2, 3], 8, 1.0),
    ("2 ** 3 ** 2", [2, 3, 2], 512, 1.0),                  # right-associative
    ("-2**2", [2, 2], -4, 1.0),                            # unary minus binds looser than **
    ("2**-1", [2, 1], 0.5, 1.0),
    ("7 // 2", [7, 2], 3, 1.0),                            # floor division
    ("-7 // 2", [7, 2], -4, 1.0),
    ("7 / 2", [7, 2], 3.5, 1.0),
    ("7 / 2", [7, 2], 3, 0.0),
    ("+7 - 2", [7, 2], 5, 1.0),                            # unary plus
    ("-35 + 44 + 19", NUMS, TARGET, 1.0),                  # unary minus
    ("--" * 8 + "7", [7], 7, 1.0),
    ("- - -7", [7], -7, 1.0),
    ("1 / 3 * 3", [1, 3, 3], 1, 1.0),                      # floats, as Python computes them
    ("1 / 3", [1, 3], "0.33333", 1.0),                     # within 1e-5
    ("1 / 3", [1, 3], "0.3333", 0.0),
    ("10**300 / 10**299", [10, 300, 10, 299], 10, 1.0),     # big ints, true division
    ("(2**1100) // (2**1099)", [2, 1100, 2, 1099], 2, 1.0),  # at the power limit
    ("00 + 28", [0, 28], 28, 1.0),                         # "00" is a valid literal
    ("05 + 23", [5, 23], 28, 0.0),                         # leading zeros: syntax error
    # what cannot score
    ("(2)(3)", [2, 3], 6, 0.0),                            # a call
    ("2(3)", [2, 3], 6, 0.0),
    ("()", [], 0, 0.0),                                    # the empty tuple
    ("(44 + 19 - 35) * ()", NUMS, TARGET, 0.0),
    ("5 / (3 - 3)", [5, 3, 3], 1, 0.0),                    # division by zero
    ("5 // (3 - 3)", [5, 3, 3], 1, 0.0),
    ("0 ** -1", [0, 1], 1, 0.0),
    ("(3 - 3) / 5", [3, 3, 5], 0, 1.0),                    # a zero numerator is fine
    ("99**99 / (1 / 99**99)", [99, 99, 1, 99, 99], 1, 0.0),  # too large for a float
    ("2**1100", [2, 1100], 1, 0.0),
    ("(0 - 8) ** (1 / 3)", [0, 8, 1, 3], 1, 0.0),           # complex result
])
def test_answer_is_read_as_eval_reads_it(body, numbers, target, expected):
    assert answer_reward(_answer(body), numbers, target) == expected
    assert published_answer_reward(_answer(body), numbers, target) == expected


def test_power_beyond_the_limit_scores_zero_at_once():
    for body, nums in [("9**9**9**9", [9, 9, 9, 9]), ("99**99**99**99", [99] * 4),
                       ("(9**9**9**9)(1)", [9, 9, 9, 9, 1]), ("1 // 9**9**9**9", [1, 9, 9, 9, 9])]:
        out, dt = _timed(answer_reward, _answer(body), nums, 1)
        assert out == 0.0 and dt < 0.05, (body, dt)
    # the documented difference: eval would compute 2**1101 (it is quick) and then score 2
    body = "(2**1101) // (2**1100)"
    assert published_answer_reward(_answer(body), [2, 1101, 2, 1100], 2) == 1.0
    assert answer_reward(_answer(body), [2, 1101, 2, 1100], 2) == 0.0


def test_names_calls_and_floats_fail_the_character_filter():
    bodies = [
        "__import__('os').system('true')", "abs(-28)", "x + 1", "28.0", "1e3", "0x1c",
        "1_0 + 18", "[28][0]", "28 if 1 else 0", "lambda: 28", "44 % 16", "44 @ 19",
        "44 + 19 - 35; 1", "(44, 19)", "'28'", "1 < 2", "28j", "٤٤ + 19 - 35",
    ]
    for body in bodies:
        assert answer_reward(_answer(body), NUMS, TARGET) == 0.0, body


def test_evaluate_expression_is_eval():
    for body in ["1+2", " 1 + 2\n", "7//2", "2**10", "-(3)", "1/3", "2**-2", "(((5)))"]:
        assert evaluate_expression(body) == _eval(body)
        assert type(evaluate_expression(body)) is type(_eval(body))


def test_nesting_is_scored_as_eval_scores_it():
    cases = [
        ("(" * 150 + "1" + ")" * 150, [1], 1),      # within the parser's 200 levels
        ("(" * 200 + "1" + ")" * 200, [1], 1),
        ("(" * 201 + "1" + ")" * 201, [1], 1),      # too many nested parentheses
        ("-" * 990 + "1", [1], 1),                  # long unary chains
        ("--" * 200 + "7", [7], 7),
        ("- " * 500 + "7", [7], -7),
        ("-" * 400 + "(" * 100 + "1" + ")" * 100, [1], 1),
    ]
    for body, nums, target in cases:
        out, dt = _timed(answer_reward, _answer(body), nums, target)
        assert out == published_answer_reward(_answer(body), nums, target), body[:20]
        assert dt < 0.05, (body[:20], dt)
    assert answer_reward(_answer("-" * 990 + "1"), [1], 1) == 1.0
    assert answer_reward(_answer("(" * 201 + "1" + ")" * 201), [1], 1) == 0.0


def test_huge_and_deep_bodies_are_fast():
    bodies = [
        "9" * 999,                                  # huge literal
        "9" * 50_000,
        " " * 100_000 + "1",                        # long space padding, as eval allows
        "(" * 300 + "1" + ")" * 300,
        "-" * 5000 + "1",                           # beyond the parser's recursion limit
        "-" * 400 + "(" * 100 + "1" + ")" * 100,
        "1" + " * 99" * 160,                        # long product
        "99" + "/1" * 300,
        "((((99*99)*(99*99))*((99*99)*(99*99))))",
        "()" * 20_000,
        "1" + "()" * 5_000,
    ]
    for body in bodies:
        for nums in ([1], [99] * 8, [9], []):
            out, dt = _timed(answer_reward, _answer(body), nums, 1)
            assert out in (0.0, 1.0)
            assert dt < 0.05, (body[:30], dt)
    assert answer_reward(_answer(" " * 100_000 + "1"), [1], 1) == 1.0
    assert answer_reward(_answer("-" * 5000 + "1"), [1], 1) == 0.0


def test_format_reward_is_linear_on_adversarial_strings():
    texts = [
        "<think></think>\n<answer></answer>" * 3000,
        "<think>" * 15000,
        "<answer>" * 12000 + "</answer",
        "<think>" * 7000 + "</answer>" * 6000,
        "</think>\n<answer>" * 6000,
        "<think>" + "</think>\n<answer>" * 6000,
        "a" * 100_000,
    ]
    for text in texts:
        assert len(text) >= 90_000
        (fmt, dt1) = _timed(format_reward, text)
        (ans, dt2) = _timed(extract_answer, text)
        (r, dt3) = _timed(reward_function, text, NUMS, TARGET)
        assert fmt in FORMAT_VALUES
        assert max(dt1, dt2, dt3) < 0.05, (text[:40], dt1, dt2, dt3)


def test_target_as_string_or_number():
    for target in [28, 28.0, "28", " 28 ", "28.0", 28.000001]:
        assert answer_reward(_answer("44 + 19 - 35"), NUMS, target) == 1.0, target
    for target in [29, "29", 28.001, "nan", float("nan"), "inf", float("-inf"), "abc", None, [28]]:
        assert answer_reward(_answer("44 + 19 - 35"), NUMS, target) == 0.0, target


def test_numbers_may_be_any_int_like_iterable():
    assert answer_reward(_answer("44 + 19 - 35"), (44, 19, 35), TARGET) == 1.0
    assert answer_reward(_answer("44 + 19 - 35"), ["44", "19", "35"], TARGET) == 1.0
    assert answer_reward(_answer("44 + 19 - 35"), None, TARGET) == 0.0  # bad input -> 0, no raise


def test_reward_function_rejects_non_string_response():
    with pytest.raises(TypeError):
        reward_function(None, NUMS, TARGET)


# ------------------------------------------------------------------ prompt + response


def test_published_text_to_score_cuts_at_the_last_assistant_marker():
    assert published_text_to_score("no marker \n") == "no marker \n"
    assert published_text_to_score("user: q assistant: a assistant:  b \n") == "b"
    assert published_text_to_score("x assistant:") == ""
    assert published_text_to_score("Assistant: kept") == "Assistant: kept"  # case-sensitive


def test_full_text_is_scored_as_the_published_hf_scripts_score_it():
    prompt = make_prompt(NUMS, TARGET)
    assert "assistant:" not in prompt
    # the prompt's own tags: format 0.6 and the example answer, a free 0.06
    assert full_text_reward(prompt, NUMS, TARGET) == {"reward": pytest.approx(0.06),
                                                      "format_reward": 0.6, "answer_reward": 0.0}
    assert full_text_reward(prompt + GOOD, NUMS, TARGET)["reward"] == pytest.approx(1.1)
    cut = prompt + " so assistant: <answer>44 + 19 - 35</answer>  \n"
    assert full_text_reward(cut, NUMS, TARGET) == {"reward": pytest.approx(1.05),
                                                   "format_reward": 0.5, "answer_reward": 1.0}


def test_countdown_rewards_scores_responses_or_prompt_plus_response():
    prompt = make_prompt(NUMS, TARGET)
    response = " x </think>\n<answer>44 + 19 - 35</answer> assistant: <answer>44 + 19 - 35</answer>"
    cols = {"numbers": [NUMS], "target": [str(TARGET)]}
    # the response alone: scored as it is (the marker is ordinary text)
    assert countdown_rewards([prompt], [response], **cols) == [pytest.approx(1.1)]
    # prompt + response (REWARD_ON_PROMPT_AND_RESPONSE): cut after the marker, then scored
    assert countdown_rewards([prompt], [prompt + response], **cols) == [pytest.approx(1.05)]
    assert countdown_rewards([prompt], [prompt + " nothing"], **cols) == [pytest.approx(0.06)]


# ------------------------------------------------------------------ properties

_tag_fragments = st.sampled_from(
    ["<think>", "</think>", "<answer>", "</answer>", "\n", " ", "a", "<", ">", "/", "think", "answer"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_tag_fragments, max_size=12).map("".join))
def test_format_reward_matches_the_published_regexes(text):
    """The linear-time implementation agrees with the plain regex definition."""
    assert FULL_FORMAT_PATTERN.pattern == r"^<think>.*?</think>\n<answer>.*?</answer>$"
    assert format_reward(text) == published_format_reward(text)
    found = ANSWER_PATTERN.findall(text)
    assert extract_answer(text) == (found[-1] if found else None)
    assert bool(THINK_PATTERN.search(text)) == bool(re.search("<think>.*?</think>", text, re.DOTALL))


_CHAR_TOKENS = ["0", "1", "2", "3", "5", "7", "9", "+", "-", "*", "/", "**", "//", "(", ")", "()", " "]


def _safe_for_eval(body):
    """At most one power and single-digit literals around it: eval finishes at once."""
    if body.count("**") > 1:
        return False
    return "**" not in body or all(len(run) == 1 for run in re.findall(r"\d+", body))


@st.composite
def _char_bodies(draw):
    """Bodies made of the published answer characters (plus an occasional tab or final newline)."""
    tokens = draw(st.lists(st.sampled_from(_CHAR_TOKENS), min_size=1, max_size=10))
    body = draw(st.sampled_from(["", " "])).join(tokens)
    body = draw(st.sampled_from(["", " ", "  "])) + body + draw(st.sampled_from(["", "", " ", "\n"]))
    if draw(st.integers(0, 9)) == 0:
        body = body.replace(" ", "\t", 1)
    return body


@st.composite
def _expressions(draw, depth=3):
    """Random well-formed expressions: literals, + - * / // **, unary + and -, optional parens."""
    powers = [0]

    def build(d):
        if d == 0 or draw(st.integers(0, 3)) == 0:
            return str(draw(st.integers(0, 99)))
        if draw(st.integers(0, 5)) == 0:
            return draw(st.sampled_from(["-", "+", "- "])) + build(d - 1)
        op = draw(st.sampled_from(["+", "-", "*", "/", "//", "**"]))
        left = build(d - 1)
        if op == "**":
            if powers[0] >= 2:
                op = "*"
            else:
                powers[0] += 1
                right = draw(st.sampled_from(["0", "1", "2", "3", "-1", "-2", "(1)", "( 2 )"]))
                return f"({left}){op}{right}" if draw(st.booleans()) else f"{left} {op} {right}"
        right = build(d - 1)
        text = f"{left}{draw(st.sampled_from(['', ' ']))}{op}{draw(st.sampled_from(['', ' ']))}{right}"
        return f"({text})" if draw(st.booleans()) else text

    return build(depth)


def _compare_with_published(body, target_choice, structured=False):
    assume(structured or _safe_for_eval(body))  # structured: at most two powers, exponents <= 3
    assume(not _has_power_beyond_limit(body))
    numbers = _digits(body)
    try:
        value = _eval(body)
        exact = value if isinstance(value, (int, float)) else 0
    except Exception:
        exact = 0
    try:
        target = [exact, exact + 1, str(exact), 28, exact + 5e-6][target_choice]
    except (OverflowError, ValueError):
        target = 28
    response = f" r </think>\n<answer>{body}</answer>"
    assert answer_reward(response, numbers, target) == published_answer_reward(response, numbers,
                                                                                target), (body, target)
    r = reward_function(response, numbers, target)
    assert r["format_reward"] == published_format_reward("<think>" + response)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
@given(_char_bodies(), st.integers(0, 4))
def test_answer_reward_matches_eval_on_character_soup(body, target_choice):
    _compare_with_published(body, target_choice)


@pytest.mark.slow  # seconds: the full suite runs it, the fast set does not
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
@given(_expressions(), st.sampled_from(["", " ", "\n", "  "]), st.integers(0, 4))
def test_answer_reward_matches_eval_on_random_expressions(body, pad, target_choice):
    _compare_with_published(pad.strip("\n") + body + pad, target_choice, structured=True)


@settings(max_examples=300, deadline=None)
@given(_expressions())
def test_evaluate_expression_gives_evals_value_and_type(body):
    assume(not _has_power_beyond_limit(body))
    try:
        expected = _eval(body)
    except Exception as error:
        with pytest.raises(type(error)):
            evaluate_expression(body)
        return
    value = evaluate_expression(body)
    assert type(value) is type(expected)
    assert value == expected or (value != value and expected != expected)  # nan == nan


def _check_result(r):
    assert set(r) == {"reward", "format_reward", "answer_reward"}
    assert r["format_reward"] in FORMAT_VALUES
    assert r["answer_reward"] in (0.0, 1.0)
    assert r["reward"] == pytest.approx(0.1 * r["format_reward"] + r["answer_reward"])


_max_seconds = {"arbitrary": 0.0, "near_miss": 0.0}

_numbers = st.lists(st.integers(1, 99), min_size=3, max_size=4)
_targets = st.one_of(st.integers(-1000, 1000), st.integers(1, 999).map(str),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=300),
        st.lists(st.one_of(_tag_fragments, st.text(max_size=8)), max_size=40).map("".join),
    ),
    _numbers,
    _targets,
)
def test_arbitrary_text_never_raises_and_is_fast(response, numbers, target):
    r, dt = _timed(reward_function, response, numbers, target)
    _check_result(r)
    _max_seconds["arbitrary"] = max(_max_seconds["arbitrary"], dt)
    assert _max_seconds["arbitrary"] < 0.05


@st.composite
def _near_miss(draw):
    numbers = draw(_numbers)
    target = draw(st.one_of(st.integers(1, 999), st.integers(1, 999).map(str)))
    pieces = [str(n) for n in numbers]
    extra = ["+", "-", "*", "/", "(", ")", "**", "//", " ", "0", "1", ".", "5.0", "x", "=",
             "99999999999", "(" * 60, ")" * 60, "-" * 30, "()", "\t", "\n"]
    tokens = draw(st.lists(st.sampled_from(pieces + extra), max_size=25))
    body = draw(st.sampled_from(["", " ", "\n"])).join(tokens)
    if draw(st.booleans()):  # a well-formed expression over the item numbers
        ops = draw(st.lists(st.sampled_from(["+", "-", "*", "/", "**", "//"]),
                            min_size=len(numbers) - 1, max_size=len(numbers) - 1))
        order = draw(st.permutations(pieces))
        body = order[0] + "".join(f" {op} {n}" for op, n in zip(ops, order[1:]))
    prefix = draw(st.sampled_from(["", " ok </think>\n", " x </think> ", "<answer>9</answer>"]))
    suffix = draw(st.sampled_from(["", " ", "</answer>", "<answer>", "\n"]))
    return prefix + "<answer>" + body + "</answer>" + suffix, numbers, target


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_near_miss())
def test_near_miss_answers_never_raise_and_are_fast(case):
    response, numbers, target = case
    r, dt = _timed(reward_function, response, numbers, target)
    _check_result(r)
    _max_seconds["near_miss"] = max(_max_seconds["near_miss"], dt)
    assert _max_seconds["near_miss"] < 0.05
