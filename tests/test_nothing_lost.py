"""Nothing lost, once per trainer: resume, stop, refusals and overwrite, for the plain trainer and
the accelerated version (2 transformers engines under Ray) alike, since both run es_llm/loop.py
with one run directory (es_llm/rundir.py).

The tests' tiny model (fp32); the accelerated runs go through tests/accl_varied_reward.py (the real
script on a reward the tiny model can earn) with fp32 masters, so they are reproducible bit for bit
whichever engine evaluates which member.
"""
import os
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, ROOT, run_main
from es_llm import checkpoint as ckpt

pytestmark = pytest.mark.slow

TINY = ["--population_size", "4", "--sigma", "0.05", "--alpha", "0.02", "--max_new_tokens", "6",
        "--precision", "fp32", "--report_to", "none"]


@dataclass
class Trainer:
    name: str
    model_dir: Path

    def command(self, out: Path, iterations: int, *extra) -> list:
        if self.name == "plain":
            return [PYTHON, "es_fine-tuning_conciseness.py", "--model_name", str(self.model_dir),
                    "--gpu_threads", "1", "--output_dir", str(out), "--num_iterations",
                    str(iterations), *TINY, *extra]
        return [PYTHON, str(ROOT / "tests" / "accl_varied_reward.py"), "--model_name",
                str(self.model_dir), "--engine", "transformers", "--num_engines", "2",
                "--data_sample", "4", "--noise_mode", "iid", "--master_weights", "fp32",
                "--experiment_dir", str(out.parent), "--run_name", out.name,
                "--num_iterations", str(iterations), *TINY, *extra]

    def resumed(self, printed: list) -> list:
        """The printed resume command, run the way the test runs this trainer."""
        script = "es_fine-tuning_conciseness.py" if self.name == "plain" else \
            str(ROOT / "tests" / "accl_varied_reward.py")
        return [PYTHON, script, *printed[2:]]

    def weights(self, out: Path) -> dict:
        return load_file(str(out / ("model.safetensors" if self.name == "plain"
                                    else "final_model/model.safetensors")))


@pytest.fixture(scope="module", params=["plain", "accelerated"])
def trainer(request, tiny_model_dir):
    return Trainer(request.param, tiny_model_dir)


_FOUR = {}


@pytest.fixture
def four(trainer, tmp_path_factory):
    """The uninterrupted 4-iteration run of `trainer` (the tests only read it), run once per
    session and worker: a module-scoped fixture would run it again each time pytest-xdist's
    order leaves the module and comes back (measured: twice, 23-26 s each under CI)."""
    if trainer.name not in _FOUR:
        out = tmp_path_factory.mktemp(f"{trainer.name}-four") / "run"
        run_main(trainer.command(out, 4))
        _FOUR[trainer.name] = out
    return _FOUR[trainer.name]


def metrics(out):
    return [{k: v for k, v in r.items() if not k.startswith("time_")}
            for r in ckpt.read_metrics(out / ckpt.METRICS_FILE)]


def assert_same_run(trainer, out, reference):
    assert metrics(out) == metrics(reference)
    a, b = trainer.weights(out), trainer.weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = ckpt.load_state(out)
    assert state["finished"] and state["iteration"] == metrics(reference)[-1]["iteration"]


def test_two_plus_two_resumed_iterations_equal_four(trainer, tmp_path, four):
    out = tmp_path / "run"
    run_main(trainer.command(out, 2))
    proc = run_main(trainer.command(out, 4, "--resume", str(out)))
    assert f"resuming from {out} at iteration 2" in proc.stdout
    assert "Iteration 1/4" not in proc.stdout and "Iteration 3/4" in proc.stdout
    assert_same_run(trainer, out, four)


def test_sigterm_saves_a_checkpoint_and_the_printed_command_resumes_it(trainer, tmp_path, four):
    out = tmp_path / "run"
    proc = subprocess.Popen(trainer.command(out, 4), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Iteration 1/4"):
                proc.send_signal(signal.SIGTERM)  # the driver alone, as `kill PID` does
                break
        output = "".join(lines) + proc.stdout.read()
        assert proc.wait(timeout=180) == 130, output
        left = subprocess.run(["ps", "-o", "pid=", "-s", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
        assert left == [], "engines, Ray or ranks outlived the driver"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = ckpt.list_checkpoints(out)
    assert len(saved) == 1 and f"checkpoint saved to {saved[0]}" in output
    iteration = ckpt.load_state(saved[0])["iteration"]
    assert 1 <= iteration < 4
    assert [r["iteration"] for r in metrics(out)] == list(range(1, iteration + 1))
    assert ckpt.STATE_FILE not in os.listdir(out)
    printed = shlex.split(output.split("Resume with:\n", 1)[1].splitlines()[0])
    assert printed[0] == "python" and printed[-2:] == ["--resume", str(out)]
    run_main(trainer.resumed(printed))
    assert_same_run(trainer, out, four)


def test_resume_with_another_population_is_refused_naming_the_mismatch(trainer, four, tmp_path):
    args = trainer.command(tmp_path / "other", 6, "--resume", str(four))
    args[args.index("--population_size") + 1] = "6"
    proc = run_main(args, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "population_size: checkpoint has 4, this run has 6" in proc.stderr
    assert not (tmp_path / "other").exists() or not os.listdir(tmp_path / "other")


def test_a_finished_run_is_refused_then_replaced_with_overwrite(trainer, tmp_path, four):
    """A new run, or another run resumed, into a directory that holds a finished run is refused
    and changes none of its files; with --overwrite the new run replaces only the old run's."""
    out = tmp_path / "run"
    run_main(trainer.command(out, 1))
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = run_main(trainer.command(out, 2), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "already holds a finished run (1 iterations)" in proc.stderr and "--overwrite" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    proc = run_main(trainer.command(out, 6, "--resume", str(four)), check=False)
    assert proc.returncode != 0 and "already holds a finished run" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    run_main(trainer.command(out, 2, "--overwrite"))
    assert [r["iteration"] for r in metrics(out)] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine"  # only the old run's files went


@pytest.mark.parametrize("flag, value, message", [
    ("--sigma", "-1", "sigma must be a positive number"),
    ("--population_size", "0", "population_size must be >= 1"),
    ("--model_name", "no/such-model-anywhere", "could not load model"),
])
def test_bad_input_is_refused_with_the_reason_and_writes_no_run(trainer, tmp_path, flag, value,
                                                                 message):
    out = tmp_path / "run"
    args = trainer.command(out, 2)
    args[args.index(flag) + 1] = value
    proc = run_main(args, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (out / ckpt.METRICS_FILE).exists() and not ckpt.list_checkpoints(out)
