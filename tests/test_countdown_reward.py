"""Tests for the Countdown reward (countdown/countdown_task.py)."""

import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from countdown.countdown_task import (
    ANSWER_PATTERN,
    FULL_FORMAT_PATTERN,
    THINK_PATTERN,
    answer_reward,
    countdown_reward,
    extract_answer,
    format_reward,
    make_prompt,
    reward_function,
)

NUMS = [44, 19, 35]
TARGET = 28  # 44 + 19 - 35
GOOD = " 44 + 19 = 63, 63 - 35 = 28 </think>\n<answer>(44 + 19) - 35</answer>"
FORMAT_VALUES = {0.0, 0.1, 0.5, 0.6, 1.0}


def _answer(body):
    return f"<think>x</think>\n<answer>{body}</answer>"


def _timed(fn, *args):
    t0 = time.thread_time()  # CPU time: a loaded machine must not fail the bound
    out = fn(*args)
    return out, time.thread_time() - t0


# ------------------------------------------------------------------ exact cases


def test_correct_answer_scores_1_1():
    r = reward_function(GOOD, NUMS, TARGET)
    assert r["format_reward"] == 1.0
    assert r["answer_reward"] == 1.0
    assert r["reward"] == pytest.approx(1.1)
    assert countdown_reward(GOOD, {"numbers": NUMS, "target": "28"}) == pytest.approx(1.1)


def test_reward_is_point_one_format_plus_answer():
    r = reward_function(" hmm </think>\n<answer>44 + 19 + 35</answer>", NUMS, TARGET)
    assert r == {"reward": pytest.approx(0.1), "format_reward": 1.0, "answer_reward": 0.0}
    r = reward_function(" <answer>44 + 19 - 35</answer>", NUMS, TARGET)  # no </think>
    assert r["format_reward"] == 0.5 and r["answer_reward"] == 1.0
    assert r["reward"] == pytest.approx(1.05)


def test_format_levels():
    assert format_reward("<think>a</think>\n<answer>b</answer>") == 1.0
    assert format_reward("  <think>a</think>\n<answer>b</answer>\n ") == 1.0  # stripped
    assert format_reward("<think></think>\n<answer></answer>") == 1.0  # empty bodies
    assert format_reward("<think>a\nb</think>\n<answer>c\nd</answer>") == 1.0  # DOTALL
    # not the full layout -> partial credit for each pair present anywhere
    assert format_reward("<think>a</think> <answer>b</answer>") == 0.6  # space, not \n
    assert format_reward("<think>a</think>\n<answer>b</answer> trailing") == 0.6
    assert format_reward("lead <think>a</think>\n<answer>b</answer>") == 0.6
    assert format_reward("<think>a</think> nothing else") == 0.1
    assert format_reward("<answer>b</answer>") == 0.5
    assert format_reward("no tags at all") == 0.0
    assert format_reward("<think>a <answer>b") == 0.0  # unclosed
    assert format_reward("</think>a<think> </answer>b<answer>") == 0.0  # wrong order


def test_reward_function_prepends_think():
    assert reward_function(" r </think>\n<answer>1</answer>", [1], 1)["format_reward"] == 1.0
    assert reward_function("just text", [1], 1)["format_reward"] == 0.0
    assert reward_function("</think>", [1], 1)["format_reward"] == 0.1


def test_last_answer_counts():
    text = "<think>t</think>\n<answer>44 + 19 + 35</answer> no wait <answer>44 + 19 - 35</answer>"
    assert extract_answer(text) == "44 + 19 - 35"
    assert answer_reward(text, NUMS, TARGET) == 1.0
    text = "<think>t</think>\n<answer>44 + 19 - 35</answer> no wait <answer>44 - 19 + 35</answer>"
    assert answer_reward(text, NUMS, TARGET) == 0.0
    # an unclosed trailing <answer> does not replace the last complete pair
    assert extract_answer("<answer>1</answer><answer>2") == "1"
    assert extract_answer("no answer") is None
    assert answer_reward("no answer", NUMS, TARGET) == 0.0


def test_extract_answer_matches_findall_semantics():
    for text in ["<answer>a</answer><answer>b</answer>", "<answer><answer>x</answer>",
                 "<answer>a</answer></answer>", "<answer></answer>", "<answer>a<answer>b</answer>c</answer>"]:
        found = ANSWER_PATTERN.findall(text)
        assert extract_answer(text) == (found[-1] if found else None)


def test_wrong_multiset_scores_zero():
    assert answer_reward(_answer("44 + 19 - 35"), NUMS, TARGET) == 1.0
    assert answer_reward(_answer("44 + 19 - 35 + 0"), NUMS, TARGET) == 0.0  # extra literal
    assert answer_reward(_answer("44 + 19 - 35 + 35 - 35"), NUMS, TARGET) == 0.0  # reuse
    assert answer_reward(_answer("44 - 16"), NUMS, TARGET) == 0.0  # missing numbers
    assert answer_reward(_answer("63 - 35"), NUMS, TARGET) == 0.0  # merged literal
    # duplicates in the item must be used as often as they appear
    assert answer_reward(_answer("5 * 5 - 1"), [5, 5, 1], 24) == 1.0
    assert answer_reward(_answer("5 * 5 - 1"), [5, 1, 1], 24) == 0.0
    assert answer_reward(_answer("5 * 5 - 1"), [5, 1], 24) == 0.0


def test_equation_forms_and_whitespace():
    assert answer_reward(_answer(" ( 44 + 19 ) - 35 "), NUMS, TARGET) == 1.0
    assert answer_reward(_answer("\n44 +\n19\t- 35\n"), NUMS, TARGET) == 1.0
    assert answer_reward(_answer("-35 + 44 + 19"), NUMS, TARGET) == 1.0  # unary minus
    assert answer_reward(_answer("4 4 + 19 - 35"), NUMS, TARGET) == 0.0  # split literal
    assert answer_reward(_answer("44 + 19 - 35 = 28"), NUMS, TARGET) == 0.0  # '=' not allowed
    assert answer_reward(_answer(""), NUMS, TARGET) == 0.0
    assert answer_reward(_answer("   "), NUMS, TARGET) == 0.0
    # exact rational evaluation: (1/3)*3 is exactly 1
    assert answer_reward(_answer("(1 / 3) * 3"), [1, 3, 3], 1) == 1.0
    assert answer_reward(_answer("7 / 2"), [7, 2], 3.5) == 1.0
    assert answer_reward(_answer("7 / 2"), [7, 2], 3) == 0.0


def test_power_operator_rejected_without_eval():
    for body in ["9**9**9**9", "2 ** 3", "9**9**9**9**9**9**9**9"]:
        out, dt = _timed(answer_reward, _answer(body), [9, 9, 9, 9], 1)
        assert out == 0.0 and dt < 0.05
    assert answer_reward(_answer("2**3"), [2, 3], 8) == 0.0  # would be correct with eval
    assert answer_reward(_answer("7 // 2"), [7, 2], 3) == 0.0  # floor division
    assert answer_reward(_answer("+7 - 2"), [7, 2], 5) == 0.0  # unary plus rejected


def test_names_calls_and_floats_rejected():
    bodies = [
        "__import__('os').system('true')", "abs(-28)", "x + 1", "28.0", "1e3", "0x1c",
        "1_0 + 18", "[28][0]", "28 if 1 else 0", "lambda: 28", "44 % 16", "44 @ 19",
        "44 + 19 - 35; 1", "(44, 19)", "'28'", "1 < 2", "28j", "٤٤ + 19 - 35", "05 + 23",
    ]
    for body in bodies:
        assert answer_reward(_answer(body), NUMS, TARGET) == 0.0, body
    # float literals are rejected even when they would be correct
    assert answer_reward(_answer("44.0 + 19 - 35"), [44.0, 19, 35], TARGET) == 0.0


def test_division_by_zero_scores_zero():
    assert answer_reward(_answer("5 / (3 - 3)"), [5, 3, 3], 1) == 0.0
    assert answer_reward(_answer("(2 - 2) / (3 - 3)"), [2, 2, 3, 3], 0) == 0.0
    assert answer_reward(_answer("(3 - 3) / 5"), [3, 3, 5], 0) == 1.0  # zero numerator is fine


def test_huge_numbers_and_deep_nesting_are_fast():
    bodies = [
        "9" * 999,                                  # huge literal
        "9" * 5000,                                 # over the length cap
        "(" * 300 + "1" + ")" * 300,                # nesting beyond parser limits
        "(" * 150 + "1" + ")" * 150,
        "-" * 990 + "1",                            # deep unary chain
        "-" * 400 + "(" * 100 + "1" + ")" * 100,
        "1" + " * 99" * 160,                         # long product
        "99" + "/1" * 300,
        "((((99*99)*(99*99))*((99*99)*(99*99))))",
    ]
    for body in bodies:
        for nums in ([1], [99] * 8, [9]):
            out, dt = _timed(answer_reward, _answer(body), nums, 1)
            assert out in (0.0, 1.0)
            assert dt < 0.05, (body[:30], dt)
    # a short unary-minus chain with the right literals is still evaluated correctly; a chain
    # deeper than MAX_NESTING scores 0 without being parsed
    assert answer_reward(_answer("--" * 8 + "7"), [7], 7) == 1.0
    assert answer_reward(_answer("--" * 200 + "7"), [7], 7) == 0.0


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


def test_prompt_ends_with_think_and_shows_numbers():
    p = make_prompt([44, 19, 35], "28")
    assert p.endswith("<think>")
    assert "[44 19 35]" in p and "equals 28" in p
    assert "(+, -, *, /)" in p and "exactly once" in p
    assert "<answer> (1 + 2) / 3 </answer>" in p
    assert make_prompt([1, 2, 3, 4], 10.0) == make_prompt([1, 2, 3, 4], "10")


# ------------------------------------------------------------------ properties

_tag_fragments = st.sampled_from(
    ["<think>", "</think>", "<answer>", "</answer>", "\n", " ", "a", "<", ">", "/", "think", "answer"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_tag_fragments, max_size=12).map("".join))
def test_format_reward_matches_reference_regex(text):
    """The linear-time implementation agrees with the plain regex definition."""
    s = text.strip()
    if FULL_FORMAT_PATTERN.fullmatch(s):
        expected = 1.0
    else:
        expected = (0.1 if THINK_PATTERN.search(s) else 0.0) + (0.5 if ANSWER_PATTERN.search(s) else 0.0)
    assert format_reward(text) == expected
    found = ANSWER_PATTERN.findall(text)
    assert extract_answer(text) == (found[-1] if found else None)


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
             "99999999999", "(" * 60, ")" * 60, "-" * 30]
    tokens = draw(st.lists(st.sampled_from(pieces + extra), max_size=25))
    body = draw(st.sampled_from(["", " ", "\n"])).join(tokens)
    if draw(st.booleans()):  # a well-formed expression over the item numbers
        ops = draw(st.lists(st.sampled_from(["+", "-", "*", "/"]), min_size=len(numbers) - 1,
                            max_size=len(numbers) - 1))
        order = draw(st.permutations(pieces))
        body = order[0] + "".join(f" {op} {n}" for op, n in zip(ops, order[1:]))
    prefix = draw(st.sampled_from(["", " ok </think>\n", " x </think> ", "<answer>9</answer>"]))
    suffix = draw(st.sampled_from(["", " ", "</answer>", "<answer>"]))
    return prefix + "<answer>" + body + "</answer>" + suffix, numbers, target


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_near_miss())
def test_near_miss_answers_never_raise_and_are_fast(case):
    response, numbers, target = case
    r, dt = _timed(reward_function, response, numbers, target)
    _check_result(r)
    _max_seconds["near_miss"] = max(_max_seconds["near_miss"], dt)
    assert _max_seconds["near_miss"] < 0.05


@settings(max_examples=200, deadline=None)
@given(_numbers, st.lists(st.sampled_from(["+", "-", "*"]), min_size=3, max_size=3))
def test_left_to_right_expression_over_item_numbers_scores_when_target_matches(numbers, ops):
    body = str(numbers[0]) + "".join(f" {op} {n}" for op, n in zip(ops, numbers[1:]))
    value = _eval_reference(body)
    r = reward_function(f" t </think>\n<answer>{body}</answer>", numbers, str(value))
    assert r["answer_reward"] == 1.0 and r["format_reward"] == 1.0
    r = reward_function(f" t </think>\n<answer>{body}</answer>", numbers, value + 1)
    assert r["answer_reward"] == 0.0


def _eval_reference(body):
    """Reference evaluator for + - * only with standard precedence (no eval)."""
    tokens = body.split()
    # fold multiplications first
    terms, signs = [int(tokens[0])], [1]
    i = 1
    while i < len(tokens):
        op, n = tokens[i], int(tokens[i + 1])
        if op == "*":
            terms[-1] *= n
        else:
            terms.append(n)
            signs.append(1 if op == "+" else -1)
        i += 2
    return sum(s * t for s, t in zip(signs, terms))
