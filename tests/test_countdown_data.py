"""Tests for the shipped Countdown data file, its generator and its loader."""

import json
import re

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
        assert item["context"] == make_prompt(nums, target)
        assert item["context"].endswith("<think>")
        assert f"[{' '.join(map(str, nums))}]" in item["context"]
        assert f"equals {target}." in item["context"]
        literals = sorted(int(t) for t in re.findall(r"[0-9]+", item["solution"]))
        assert literals == sorted(nums)
        r = reward_function(f" ... </think>\n<answer>{item['solution']}</answer>", nums, target)
        assert r["answer_reward"] == 1.0 and r["format_reward"] == 1.0


def test_shipped_data_mixes_three_and_four_number_items(shipped):
    sizes = [len(item["numbers"]) for item in shipped]
    assert 0.3 < sizes.count(3) / len(sizes) < 0.7


def test_generator_is_deterministic(tmp_path):
    a = make_data.main(["--seed", "0", "--num_items", "50", "--output", str(tmp_path / "a.json")])
    b = make_data.main(["--seed", "0", "--num_items", "50", "--output", str(tmp_path / "b.json")])
    assert a.read_bytes() == b.read_bytes()
    c = make_data.main(["--seed", "1", "--num_items", "50", "--output", str(tmp_path / "c.json")])
    assert c.read_bytes() != a.read_bytes()


def test_generator_prefix_matches_shipped_file(shipped):
    assert make_data.generate_items(50, seed=0) == shipped[:50]


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
