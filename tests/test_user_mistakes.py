"""A user's task file, data and disk: every mistake named before it costs, nothing half-written.

The reward contract, the rows and the reward's signature checked before the model loads, a save
that cannot be written (the full disk simulated by a writer raising ENOSPC part way through), and
a user's task naming the accelerated run. In-process on the tiny model; one end-to-end run on the
bundled model.
"""
import errno
import json
import shlex
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from conftest import PYTHON, run_main, run_script
from es_llm import checkpoint as ckpt
from es_llm.rundir import RunFailed
from es_llm.tasks import RewardError, Task, load_task_file

COMPLETIONS = ["one two", "three"]


def task_file(tmp_path, returns: str, signature="completions, prompts, **_", name="mine.py"):
    path = tmp_path / name
    path.write_text(f"DATASET = [{{'prompt': 'a'}}, {{'prompt': 'b'}}]\n"
                    f"import numpy as np\nimport torch\n"
                    f"def reward({signature}):\n    return {returns}\n")
    return path


# --------------------------------------------------------------------------- the reward contract

@pytest.mark.parametrize("returns, shown", [
    ('"7"', "str '7'"), ('"12"', "str '12'"), ('b"12"', "bytes b'12'"), ("{'a': 1}", "dict"),
    ("3.5", "float 3.5"), ("[None, None]", "list [None, None]"),
    ("['1.5', '2']", "list ['1.5', '2']"), ("['good', 'bad']", "list ['good', 'bad']"),
    ("[True, False]", "list [True, False]"), ("np.array([[1.0, 2.0]])", "ndarray"),
    ("torch.tensor([True, False])", "Tensor"), ("(x for x in [1, 2])", "generator"),
    ("[1.0]", "1 rewards for 2 completions (seed 1234)"),
    ("[1.0, 2.0, 3.0]", "3 rewards for 2 completions (seed 1234)")])
def test_a_reward_that_breaks_the_contract_is_refused_naming_file_function_seed_and_value(
        tmp_path, returns, shown):
    path = task_file(tmp_path, returns)
    with pytest.raises(RewardError) as refused:
        load_task_file(path).score(COMPLETIONS, seed=1234)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: reward() returned {shown}") and "seed 1234" in message
    assert "one per completion" in message
    assert "real numbers" in message  # what is accepted


@pytest.mark.parametrize("returns", [
    "[1, 2.5]", "(1, 2.5)", "[np.float32(1.0), np.int64(2)]", "np.array([1.0, 2.5])",
    "np.array([1, 2], dtype=np.int32)", "torch.tensor([1.0, 2.5])",
    "torch.tensor([1.0, 2.5], dtype=torch.bfloat16)"])
def test_real_numbers_in_a_list_array_or_tensor_are_accepted(tmp_path, returns):
    rewards = load_task_file(task_file(tmp_path, returns)).score(COMPLETIONS, seed=1)
    assert all(type(r) is float for r in rewards) and len(rewards) == 2
    assert rewards[0] == 1.0


def test_a_reward_that_raises_names_its_file_line_and_seed(tmp_path):
    path = task_file(tmp_path, "{}['missing']")
    with pytest.raises(RewardError, match=rf"{path}: reward\(\) raised KeyError: 'missing' \(at "
                                          rf"{path}, line 5\) for seed 7"):
        load_task_file(path).score(COMPLETIONS, seed=7)


def test_builtin_tasks_name_themselves():
    task = Task("demo", ["a"], lambda prompts, completions: "1")
    with pytest.raises(RewardError, match=r"task 'demo': <lambda>\(\) returned str '1' for seed 3"):
        task.score(["x"], seed=3)


# ---------------------------------------------------------------------- checked before the model

def test_a_required_parameter_that_no_column_feeds_is_named_with_the_columns(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "target": 1, "words": 2}\n')
    path = task_file(tmp_path, "[0.0]", "completions, prompts, answer, **_")
    with pytest.raises(ValueError, match=rf"{path}: reward\(\) needs the parameter 'answer', "
                                         rf"which no column of the data provides \(columns: "
                                         rf"'target', 'words'\)"):
        load_task_file(path, data)


def test_a_column_a_reward_cannot_take_is_named(tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"prompt": "a", "target": 1}]))
    path = task_file(tmp_path, "[0.0]", "completions, prompts")
    with pytest.raises(ValueError, match=r"is called with 'target' but takes no such parameter; "
                                         r"add them, or \*\*columns"):
        load_task_file(path, data)
    assert load_task_file(task_file(tmp_path, "[0.0]", "completions, prompts, target=None"),
                          data).columns == {"target": [1]}


def test_columns_are_the_keys_of_every_row_and_an_odd_row_is_named(tmp_path):
    path = task_file(tmp_path, "[0.0] * len(completions)")
    rows = [{"prompt": f"p{i}"} for i in range(5)]
    rows[3]["extra"] = 1  # a later row with a key the others lack: named, not dropped
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="row 3 has the column 'extra' that 4 other rows lack"):
        load_task_file(path, data)
    rows = [{"prompt": f"p{i}", "x": i} for i in range(5)]
    del rows[2]["x"]
    data.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="row 2 lacks the column 'x' that 4 other rows have"):
        load_task_file(path, data)


def test_a_broken_jsonl_line_is_named_by_its_line_in_the_file(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a"}\n\n{"prompt": "b", "x": }\n')
    with pytest.raises(ValueError, match=r"rows.jsonl: line 3 is not valid JSON \(.*column 22\)"):
        load_task_file(task_file(tmp_path, "[0.0]"), data)


# --------------------------------------------------------------------------- a failure to write

def full_disk_after(monkeypatch, module, name: str, calls: int, path_arg=None):
    """Make module.name raise ENOSPC from its `calls`-th call on, having first written part of
    the file its argument `path_arg` names (as a filling disk does)."""
    real = getattr(module, name)
    count = {"n": 0}

    def writer(*args, **kwargs):
        count["n"] += 1
        if count["n"] < calls:
            return real(*args, **kwargs)
        if path_arg is not None:
            ckpt.Path(args[path_arg]).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, name, writer)


class Filling:
    """A file whose writes reach the disk in part, then fail with ENOSPC."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, text):
        self.handle.write(text[:10])
        self.handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


def plain_config(model_dir, out, **overrides):
    from es_llm.trainer import TrainConfig

    values = dict(task="conciseness", model_name=str(model_dir), output_dir=str(out),
                  num_iterations=3, population_size=2, sigma=0.05, alpha=0.02, max_new_tokens=3,
                  precision="fp32", gpu_threads=1, report_to="none", save_every=1)
    values.update(overrides)
    return SimpleNamespace(cfg=TrainConfig(**values))


def conciseness():
    return Task("conciseness", ["Solve: 3 + 5 ="], lambda prompts, completions, target:
                [-abs(len(c) - len(t)) for c, t in zip(completions, target)], {"target": ["8"]})


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_names_the_path_keeps_the_last_and_resumes(
        tiny_model_dir, tmp_path, monkeypatch):
    from es_llm import trainer

    out = tmp_path / "run"
    full_disk_after(monkeypatch, ckpt, "save_file", 2, path_arg=1)  # checkpoint 2's masters
    cfg = plain_config(tiny_model_dir, out, master_weights="fp32").cfg
    with pytest.raises(RunFailed) as failed:
        trainer.train(cfg, conciseness())
    first, *rest = str(failed.value).splitlines()
    assert first == (f"could not write {out / 'checkpoint-2'} (OSError: No space left on device)")
    assert rest[0] == f"the last complete checkpoint is {out / 'checkpoint-1'}."
    assert rest[1] == "Resume with:" and "--resume" in rest[2] and str(out) in rest[2]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "metrics.jsonl"]
    assert [r["iteration"] for r in ckpt.read_metrics(out / ckpt.METRICS_FILE)] == [1, 2]
    monkeypatch.undo()
    # The last checkpoint is intact: the run goes on from it and finishes.
    trainer.train(plain_config(tiny_model_dir, out, master_weights="fp32",
                               resume=str(out)).cfg, conciseness())
    assert ckpt.load_state(out)["finished"]
    assert [r["iteration"] for r in ckpt.read_metrics(out / ckpt.METRICS_FILE)] == [1, 2, 3]


@pytest.mark.slow
def test_a_full_disk_in_the_final_save_or_the_metrics_says_no_checkpoint_yet(
        tiny_model_dir, tmp_path, monkeypatch):
    from es_llm import trainer

    out = tmp_path / "final"

    def quota_exceeded(model, tokenizer, directory):
        (ckpt.Path(directory) / "config.json").write_text("{")  # part of the save
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(ckpt, "save_model", quota_exceeded)
    with pytest.raises(RunFailed) as failed:
        trainer.train(plain_config(tiny_model_dir, out, save_every=0, num_iterations=1).cfg,
                      conciseness())
    assert str(failed.value).splitlines() == [
        f"could not write {out} (OSError: Disk quota exceeded)",
        "no checkpoint yet (--save_every N saves one every N iterations): the run must start "
        "again"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]  # no .final.tmp, no state
    monkeypatch.undo()

    out = tmp_path / "metrics"
    monkeypatch.setattr(ckpt, "open", lambda path, mode="r": Filling(open(path, mode)) if mode == "a"
                        else open(path, mode), raising=False)
    with pytest.raises(RunFailed, match=rf"could not write {out / 'metrics.jsonl'} \(OSError: No "
                                        rf"space left on device\)\nno checkpoint yet"):
        trainer.train(plain_config(tiny_model_dir, out).cfg, conciseness())
    monkeypatch.undo()
    assert list(out.iterdir()) == []  # a new run that recorded nothing leaves nothing behind


def test_the_accelerated_final_save_cleans_up_and_names_the_path(tiny_model_dir, tmp_path,
                                                                monkeypatch):
    """PoolEvaluator.save_final with a stand-in pool (the engines' side is tested with Ray
    elsewhere): a failing write leaves no temporary file and no finished state."""
    from accelerated import trainer as accelerated
    from es_llm.config import AcceleratedConfig
    from es_llm.hf_weights import hf_layout
    from es_llm.models import load_model

    model, _ = load_model(str(tiny_model_dir), "fp32")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pool = SimpleNamespace(call_all=lambda method: ["same", "same"],
                           call_main=lambda method: state if method == "state_dict" else None)
    cfg = AcceleratedConfig(task="t", model_name=str(tiny_model_dir), output_dir=str(tmp_path),
                            precision="fp32", num_iterations=2, num_engines=2)
    layout = hf_layout(str(tiny_model_dir))
    evaluator = accelerated.PoolEvaluator(cfg, pool, str(tiny_model_dir), layout, None)
    full_disk_after(monkeypatch, accelerated, "save_published_pth", 1)
    with pytest.raises(ckpt.WriteError, match=rf"could not write {tmp_path} \(OSError: No space "):
        evaluator.save_final(tmp_path, {"iteration": 2, "finished": True}, [])
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert not [p for p in left if p.endswith(".tmp")] and ckpt.STATE_FILE not in left, left


# --------------------------------------------------------------------------- the accelerated name

def test_a_users_task_names_the_accelerated_run():
    from accelerated.trainer import default_run_name
    from es_llm.config import AcceleratedConfig

    cfg = AcceleratedConfig(task="word_count", model_name="bundled", output_dir=".",
                            engine="transformers")
    assert default_run_name(cfg).startswith("word_count_SmolLM2-135M-Instruct_transformers_pop30")
    cfg.precision, cfg.optimizer, cfg.prompt_batch = "fp32", "adam", 8  # named as plain runs
    assert "_fp32_adam_batch8_" in default_run_name(cfg)


# --------------------------------------------------------------------------- end to end

THIRD_CALL_BREAKS = '''NAME = "breaks"
DATASET = [{"prompt": "Solve: 3 + 5 =", "target": "8"}]
calls = 0


def reward(completions, prompts, target, **_):
    global calls
    calls += 1
    if calls == 3:
        return "12"
    return [-abs(len(c) - len(t)) for c, t in zip(completions, target)]
'''


@pytest.mark.slow
def test_bundled_model_a_reward_of_the_wrong_type_stops_with_one_line_and_the_run_resumes(
        tmp_path):
    """bf16, the bundled model: the reward returns a string on its third call (iteration 2's first
    member); one error line, no traceback, checkpoint-1 intact, and the printed command resumes."""
    task = tmp_path / "breaks.py"
    task.write_text(THIRD_CALL_BREAKS)
    out = tmp_path / "run"
    args = [PYTHON, "es_fine-tuning.py", "--task", str(task), "--model_name", "bundled",
            "--num_iterations", "2", "--population_size", "2", "--max_new_tokens", "4",
            "--gpu_threads", "1", "--save_every", "1", "--report_to", "none",
            "--output_dir", str(out)]
    proc = run_script(args, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: {task}: reward() returned str '12' for seed ")
    assert "expected 1 rewards, one per completion" in errors[0] and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "metrics.jsonl"]
    assert load_file(str(out / "checkpoint-1" / "model.safetensors"))
    resume = proc.stderr.split("Resume with:\n", 1)[1].splitlines()[0]
    resumed = run_main([PYTHON, *shlex.split(resume)[1:]])
    assert "resuming from" in resumed.stdout and ckpt.load_state(out)["finished"]
    assert [r["iteration"] for r in ckpt.read_metrics(out / ckpt.METRICS_FILE)] == [1, 2]
