"""Tests for the shipped Countdown data file, its generator and its loader."""

import json
import random
import re
import time
from fractions import Fraction

import pytest

from countdown import make_data
from countdown.countdown_task import (
    DEFAULT_DATA_PATH,
    REQUIRED_FIELDS,
    TEST_SIZE,
    TRAIN_SIZE,
    load_countdown_data,
    make_prompt,
    reward_function,
)


@pytest.fixture(scope="module")
def shipped():
    with open(DEFAULT_DATA_PATH, encoding="utf-8") as f:
        return json.load(f)


def test_shipped_file_has_2200_items_with_schema_and_key_order(shipped):
    assert len(shipped) == TRAIN_SIZE + TEST_SIZE == 2200
    for i, item in enumerate(shipped):
        assert list(item) == list(REQUIRED_FIELDS)
        assert item["id"] == i
        assert isinstance(item["context"], str) and isinstance(item["solution"], str)


def test_shipped_items_are_valid_countdown_problems(shipped):
    for item in shipped:
        nums, target = item["numbers"], item["target"]
        assert len(nums) in (3, 4)
        assert all(type(n) is int and 1 <= n <= 99 for n in nums)
        assert isinstance(target, str) and re.fullmatch(r"[1-9][0-9]*", target)
        assert 1 <= int(target) <= 100
        assert item["context"] == make_prompt(nums, target)
        assert item["context"].startswith("You are a helpful assistant.")
        assert item["context"].endswith("Let me solve this step by step.\n<think>")
        assert f"[{' '.join(map(str, nums))}]" in item["context"]
        assert f"equals {target}. " in item["context"]
        literals = sorted(int(t) for t in re.findall(r"[0-9]+", item["solution"]))
        assert literals == sorted(nums)
        assert make_data.exact_value(item["solution"]) == int(target)  # exactly, not just within 1e-5
        r = reward_function(f" ... </think>\n<answer>{item['solution']}</answer>", nums, target)
        assert r["answer_reward"] == 1.0 and r["format_reward"] == 1.0


def test_shipped_data_has_the_published_distribution(shipped):
    sizes = [len(item["numbers"]) for item in shipped]
    assert 0.45 < sizes.count(3) / len(sizes) < 0.55  # about half each
    for part in (shipped[:TRAIN_SIZE], shipped[-TEST_SIZE:]):  # both splits mix the sizes
        assert 0.35 < sum(len(i["numbers"]) == 3 for i in part) / len(part) < 0.65
    numbers = [n for item in shipped for n in item["numbers"]]
    assert set(numbers) == set(range(1, 100))  # the whole range is used
    assert any(len(set(i["numbers"])) < len(i["numbers"]) for i in shipped)  # repeats happen
    targets = [int(item["target"]) for item in shipped]
    assert min(targets) == 1 and max(targets) == 100
    assert len(set(targets)) == 100
    assert 30 < sum(numbers) / len(numbers) < 70  # uniform 1..99 has mean 50


@pytest.mark.slow  # several seconds: the full suite runs it, the fast set does not
def test_solver_agrees_with_brute_force():
    """solve() finds a solution exactly when one exists (checked against an exhaustive search)."""
    def reachable(values):
        if len(values) == 1:
            return {values[0]}
        out = set()
        for i in range(len(values)):
            for j in range(len(values)):
                if i != j:
                    a, b = values[i], values[j]
                    rest = [values[k] for k in range(len(values)) if k not in (i, j)]
                    for v in [a + b, a - b, a * b] + ([a / b] if b else []):
                        out |= reachable(rest + [v])
        return out

    rng = random.Random(7)
    for _ in range(40):
        k = rng.choice((3, 4))
        high = rng.choice((6, 99))  # small numbers reach many targets, large ones few
        nums = [rng.randint(1, high) for _ in range(k)]
        reach = reachable([Fraction(n) for n in nums]) if k == 3 or high == 6 else None
        for target in range(1, 101):
            solution = make_data.solve(nums, target)
            if solution is not None:
                assert sorted(int(t) for t in re.findall(r"[0-9]+", solution)) == sorted(nums)
                assert make_data.exact_value(solution) == target
            if reach is not None:
                assert (solution is not None) == (Fraction(target) in reach), (nums, target)
    assert make_data.solve([44, 19, 35], 28) is not None
    assert make_data.solve([1, 1, 1], 100) is None


def test_float_prefilter_never_rejects_a_solvable_draw():
    rng = random.Random(3)
    draws = [[rng.randint(1, high) for _ in range(rng.choice((3, 4)))]
             for high in (12, 99) for _ in range(150)]
    draws = [d + [rng.randint(1, 100)] for d in draws]
    for size in (3, 4):
        group = [d for d in draws if len(d) == size + 1]
        for draw, ok in zip(group, make_data.maybe_solvable(group)):
            if make_data.solve(draw[:-1], draw[-1]) is not None:
                assert ok, draw


def test_generation_is_fast():
    t0 = time.process_time()
    make_data.generate_items(300, seed=5)
    assert time.process_time() - t0 < 5


def test_generator_is_deterministic(tmp_path):
    a = make_data.main(["--seed", "0", "--num_items", "50", "--output", str(tmp_path / "a.json")])
    b = make_data.main(["--seed", "0", "--num_items", "50", "--output", str(tmp_path / "b.json")])
    assert a.read_bytes() == b.read_bytes()
    c = make_data.main(["--seed", "1", "--num_items", "50", "--output", str(tmp_path / "c.json")])
    assert c.read_bytes() != a.read_bytes()


def test_generator_prefix_matches_shipped_file(shipped):
    assert make_data.generate_items(50, seed=0) == shipped[:50]


@pytest.mark.slow
def test_default_run_reproduces_shipped_file_byte_for_byte(tmp_path):
    out = make_data.main(["--output", str(tmp_path / "full.json")])
    assert out.read_bytes() == DEFAULT_DATA_PATH.read_bytes()


def test_generator_refuses_items_that_do_not_verify():
    with pytest.raises(RuntimeError, match="does not verify"):
        make_data.make_item(0, [1, 2, 3], 7, "1 + 2 + 3")
    with pytest.raises(RuntimeError, match="does not verify"):
        make_data.make_item(0, [1, 2, 3], 6, "1 + 2 + 3 + 3")


def test_load_splits_have_expected_sizes(shipped):
    train = load_countdown_data(split="train")
    test = load_countdown_data(split="test")
    assert len(train) == TRAIN_SIZE == 200 and len(test) == TEST_SIZE == 2000
    assert train == shipped[:200] and test == shipped[-2000:]
    assert not {i["id"] for i in train} & {i["id"] for i in test}
    assert len(load_countdown_data(split="all")) == 2200
    assert load_countdown_data(data_sample=10) == shipped[:10]
    assert load_countdown_data(data_sample=5, split="test") == shipped[200:205]
    assert load_countdown_data(DEFAULT_DATA_PATH, 200, "train") == train


def test_missing_file_error_names_path_and_fix(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError) as e:
        load_countdown_data(missing)
    msg = str(e.value)
    assert str(missing) in msg and "make_data.py" in msg
    assert all(f in msg for f in REQUIRED_FIELDS)


def test_malformed_json_error_names_path_and_fields(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 0, ')
    with pytest.raises(ValueError) as e:
        load_countdown_data(bad, split="all")
    msg = str(e.value)
    assert str(bad) in msg and "malformed JSON" in msg and "make_data.py" in msg
    assert all(f in msg for f in REQUIRED_FIELDS)
    bad.write_text('{"id": 0}')
    with pytest.raises(ValueError, match="not a non-empty JSON list"):
        load_countdown_data(bad, split="all")


def test_missing_field_error_names_item_and_field(tmp_path, shipped):
    items = [dict(x) for x in shipped[:3]]
    del items[2]["solution"]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(items))
    with pytest.raises(ValueError) as e:
        load_countdown_data(path, split="all")
    msg = str(e.value)
    assert str(path) in msg and "item 2" in msg and "solution" in msg and "make_data.py" in msg


def test_data_sample_errors(tmp_path, shipped):
    with pytest.raises(ValueError, match="has 200 items"):
        load_countdown_data(data_sample=201)
    with pytest.raises(ValueError, match="has 2000 items"):
        load_countdown_data(data_sample=2001, split="test")
    for n in (0, -3):
        with pytest.raises(ValueError, match=">= 1"):
            load_countdown_data(data_sample=n)
    with pytest.raises(ValueError, match="split"):
        load_countdown_data(split="validation")
    small = tmp_path / "small.json"
    small.write_text(json.dumps(shipped[:10]))
    assert len(load_countdown_data(small, split="all")) == 10
    with pytest.raises(ValueError) as e:  # train/test would overlap on a short file
        load_countdown_data(small, split="train")
    assert str(small) in str(e.value) and "2200" in str(e.value)
