"""The ES loop (es_llm/loop.py) with a stand-in evaluator: records, a stop that saves and returns,
and an error that says where the run can go on from."""
from pathlib import Path

import pytest

from es_llm import checkpoint as ckpt
from es_llm.config import TrainConfig
from es_llm.loop import run_es
from es_llm.rundir import Run, RunFailed
from es_llm.strategy import Strategy


class Saved:
    """A model or tokenizer that saves one small file."""

    def save_pretrained(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"{type(self).__name__}.txt").write_text("saved")


class Evaluator:
    is_main, label = True, ""

    def __init__(self, stop_at=None, fail_at=None, error=ValueError("a reward broke")):
        self.stop_at, self.fail_at, self.error = stop_at, fail_at, error
        self.iteration, self.finished = 0, False

    def agree(self, strategy, stop):
        self.iteration += 1
        return None if self.iteration == self.stop_at else strategy.ask()

    def evaluate(self, seeds, signs, on_result, prompts=None, iteration=None):
        if self.iteration == self.fail_at:
            raise self.error
        return [float(s % 7) for s in seeds], {"generate": 0.5}

    def update(self, seeds, weights, n, lr):
        return {"update": 0.25}

    def saveable(self):
        return Saved(), Saved(), None

    def optimizer_state(self):
        return None

    def save_final(self, out, state, records):
        ckpt.save_final(out, Saved(), Saved(), state, records)

    def finish(self):
        self.finished = True


def run(tmp_path, evaluator, iterations=3, save_every=1):
    cfg = TrainConfig(task="t", model_name="m", output_dir=str(tmp_path / "run"),
                      num_iterations=iterations, population_size=4, save_every=save_every)
    directory = Run(cfg, cfg.output_dir, "--output_dir", True, lambda saved: [])
    directory.begin()
    return run_es(cfg, evaluator, directory, Strategy(4, 33), num_prompts=2), tmp_path / "run"


def test_every_iteration_is_recorded_with_its_seeds_rewards_timings_and_generations(tmp_path):
    out, directory = run(tmp_path, Evaluator())
    assert out == directory and ckpt.load_state(directory)["finished"]
    records = ckpt.read_metrics(directory / ckpt.METRICS_FILE)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    strategy = Strategy(4, 33)
    assert [r["seeds"] for r in records] == [strategy.ask() for _ in range(3)]
    assert all(r["rewards"] == [float(s % 7) for s in r["seeds"]] for r in records)
    assert [r["generations"] for r in records] == [8, 16, 24]  # population x prompts x iteration
    assert all(r["time_generate_s"] == 0.5 and r["time_update_s"] == 0.25 for r in records)


def test_a_stop_request_saves_the_last_iteration_and_returns_none(tmp_path, capsys):
    evaluator = Evaluator(stop_at=3)
    out, directory = run(tmp_path, evaluator, save_every=0)
    assert out is None and evaluator.finished  # the front exits 130
    assert [p.name for p in ckpt.list_checkpoints(directory)] == ["checkpoint-2"]
    assert "Resume with:" in capsys.readouterr().err
    assert not (directory / ckpt.STATE_FILE).exists()  # not finished


def test_a_users_error_names_the_last_checkpoint_and_a_new_run_leaves_nothing(tmp_path):
    with pytest.raises(RunFailed) as failed:
        run(tmp_path / "a", Evaluator(fail_at=3))
    assert str(failed.value).splitlines()[:2] == [
        "a reward broke", f"the last complete checkpoint is {tmp_path / 'a/run/checkpoint-2'}."]
    with pytest.raises(RunFailed, match="a reward broke\nno checkpoint yet"):
        run(tmp_path / "b", Evaluator(fail_at=1))
    assert list((tmp_path / "b" / "run").iterdir()) == []


def test_any_other_error_keeps_its_type_and_carries_the_note(tmp_path):
    with pytest.raises(RuntimeError) as failed:
        run(tmp_path, Evaluator(fail_at=2, error=RuntimeError("a bug")))
    assert any("the last complete checkpoint is" in note for note in failed.value.__notes__)
