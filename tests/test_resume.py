"""Nothing lost: resume, atomic checkpoints, interrupts and stalled ranks."""
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, run_main, start_script, two_processes
from es_llm import checkpoint as ckpt
from es_llm.models import load_model

TINY = ["--population_size", "4", "--sigma", "0.05", "--alpha", "0.02", "--max_new_tokens", "6",
        "--gpu_threads", "1", "--precision", "fp32"]


def conciseness(model_dir, out, iterations, *extra):
    return [PYTHON, "es_fine-tuning_conciseness.py", "--model_name", str(model_dir),
            "--output_dir", str(out), "--num_iterations", str(iterations), *TINY, *extra]


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")}
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b):
    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_resume_from_a_checkpoint_directory_with_master_weights(tiny_model_dir, tmp_path):
    extra = ("--master_weights", "fp32", "--save_every", "1")
    full, part = tmp_path / "full", tmp_path / "part"
    run_main(conciseness(tiny_model_dir, full, 3, *extra))
    run_main(conciseness(tiny_model_dir, part, 3, *extra, "--keep_checkpoints", "2"))
    # every --save_every iterations, the last one included (as published); the newest 2 kept
    assert [p.name for p in ckpt.list_checkpoints(part)] == ["checkpoint-2", "checkpoint-3"]
    resumed = tmp_path / "resumed"
    run_main(conciseness(tiny_model_dir, resumed, 3, *extra, "--resume", str(part / "checkpoint-2")))
    assert metrics(resumed) == metrics(full)
    assert same_weights(resumed, full)


@pytest.mark.slow
def test_a_failed_save_leaves_the_previous_checkpoint_intact(tiny_model_dir, tmp_path, monkeypatch):
    model, tokenizer = load_model(str(tiny_model_dir), "fp32")
    state = {"iteration": 1, "finished": False, "rng_state": None, "config": {}}
    ckpt.save_checkpoint(tmp_path, model, tokenizer, state, [{"iteration": 1}])

    def crash(model, tokenizer, directory):
        model.save_pretrained(directory)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "save_model", crash)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(tmp_path, model, tokenizer, {**state, "iteration": 2}, [])
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert ckpt.resolve_checkpoint(tmp_path).name == "checkpoint-1"
    reloaded, _ = load_model(str(tmp_path / "checkpoint-1"), "fp32")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.parameters(), model.parameters()))
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_final(tmp_path, model, tokenizer, {**state, "finished": True}, [])
    assert not (tmp_path / ckpt.STATE_FILE).exists(), "a failed final save must not look finished"


def worker_pids(marker):
    """PIDs of the training processes (not the launcher) whose command line holds `marker`."""
    pids = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        rank = [e.split("=", 1)[1] for e in environ if e.startswith("RANK=")]
        if marker in cmdline and "es_fine-tuning_conciseness.py" in cmdline and rank \
                and "accelerate" not in cmdline:
            pids[int(rank[0])] = int(pid)
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGSTOP, signal.SIGKILL])
def test_a_stalled_or_killed_rank_does_not_hang_the_others(tiny_model_dir, tmp_path, how):
    out = tmp_path / f"run-{how.name}"
    args = [*two_processes(),
            *conciseness(tiny_model_dir, out, 1000, "--collective_timeout", "10")[1:]]
    proc = start_script(args)
    try:
        for line in proc.stdout:
            if "Iteration 1/1000" in line:
                break
        pids = worker_pids(str(out))
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], how)
        start = time.time()
        output = []
        for line in proc.stdout:  # rank 0 stops by itself, naming why
            output.append(line)
            if "the run stopped on this error" in line:
                break
        assert "[rank0]" in output[-1], "".join(output)
        assert time.time() - start < 150
        if how == signal.SIGSTOP:
            # The launcher then sends the stalled rank SIGTERM and waits 30 s before SIGKILL (its
            # own grace period, not this project's); let the rank take the signal now.
            os.kill(pids[1], signal.SIGCONT)
        proc.stdout.read()
        assert proc.wait(timeout=180) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in worker_pids(str(out)).values():
            os.kill(pid, signal.SIGKILL)
