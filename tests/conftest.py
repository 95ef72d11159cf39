"""Shared fixtures: a tiny Llama built from a config (never downloaded) with the bundled tokenizer."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers (pytest.ini: -n 2) share the cores: one thread each, for the tests and for the
    # scripts they start. Two threads each would oversubscribe the cores, and torch's threads
    # then wait on each other at every parallel region (runs measured 5 to 9 times slower).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def bundled_tokenizer_dir(tmp_path_factory):
    """The bundled tokenizer as an HF directory. Reading it out of the GGUF file takes seconds, so
    it is kept between runs in ~/.cache/es-llm (keyed by the file's size and time; written under a
    temporary name and renamed, so a crash never leaves half of one)."""
    import shutil

    from es_llm.checkpoint import atomic
    from es_llm.models import bundled_model_path, cache_root
    from transformers import AutoTokenizer

    gguf = bundled_model_path()
    stat = gguf.stat()
    path = cache_root() / f"test-tokenizer-{stat.st_size}-{int(stat.st_mtime)}"
    if not (path / "tokenizer_config.json").exists():
        tmp = tmp_path_factory.mktemp("tokenizer")
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic(path, unique=True) as writing:
                shutil.copytree(tmp, writing)
        except OSError:  # a read-only home, or another run got there first: use this run's copy
            return tmp
    return path


def build_tiny_model(directory, tokenizer_dir, seed=0, dtype=torch.float32, hidden_size=32,
                     heads=4, kv_heads=2):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_tokenizer_dir):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), bundled_tokenizer_dir)


def run_script(args, cwd=ROOT, timeout=600, check=True, env=None):
    """Run a command line (a list) with the repo's python; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def run_main(args, check=True) -> subprocess.CompletedProcess:
    """A command line (a list, as for run_script) run in this process: the script's main() with
    sys.argv set, so the test pays no new interpreter, imports or model conversion. For command
    lines whose process is not itself the point (reference runs, resumes, refusals). Returns what
    run_script returns: the exit status (a SystemExit's, 1 for a message, as Python exits) and
    what was printed (the exit message at the end of stderr); with `check`, fails unless it exits
    0. Another exception propagates (a script's traceback). The environment and the signal
    handlers the script sets are put back afterwards; the accelerated version's runs use the Ray
    this process shares (`shared_ray`) instead of starting their own."""
    import contextlib
    import io
    import signal
    from unittest import mock

    script = Path(args[1]) if Path(args[1]).is_absolute() else ROOT / args[1]
    if "accl" in script.name:
        shared_ray()
    module = load_module(script, f"main_{script.stem.replace('-', '_')}")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stdout, stderr, status = io.StringIO(), io.StringIO(), 0
    with mock.patch.object(sys, "argv", [str(script), *map(str, args[2:])]), \
            mock.patch.dict(os.environ), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        try:
            module.main()
        except SystemExit as leaving:
            status = leaving.code if isinstance(leaving.code, int) else int(leaving.code is not None)
            if isinstance(leaving.code, str):
                print(leaving.code, file=sys.stderr)
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
    done = subprocess.CompletedProcess(args, status, stdout.getvalue(), stderr.getvalue())
    if check and status != 0:
        raise AssertionError(f"{args} exited {status}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def shared_ray() -> None:
    """A local Ray in this process, started once and left running for the tests that run the
    accelerated version in-process (each run still starts and stops its own engines): Ray's start
    and shutdown cost seconds per run. `stop_shared_ray` ends it (before a test that needs no Ray
    here); the session's end does too."""
    import ray

    from accelerated.pool import start_ray

    if not ray.is_initialized():
        start_ray("local", num_cpus=max(2, len(os.sched_getaffinity(0))))


def stop_shared_ray() -> None:
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def pytest_collection_modifyitems(config, items):
    """The modules with the most slow tests first (each module's tests in their order): run on
    two workers, the long tests then start early and the short ones fill the end, so that
    neither worker waits idle for the other's last long test (measured in CI: one worker idle
    for 4 minutes with the modules in name order). The same order on every worker (xdist
    checks it)."""
    def weight(item):
        return 10 if item.get_closest_marker("ray") else 1 if item.get_closest_marker("slow") else 0

    totals = {}
    for item in items:
        totals[item.path] = totals.get(item.path, 0) + weight(item)
    items.sort(key=lambda item: -totals[item.path])  # stable: a module's tests keep their order


def pytest_sessionfinish(session, exitstatus):
    stop_shared_ray()


def start_script(args, cwd=ROOT):
    """Start a command line (a list) in its own process group, stdout and stderr merged into one
    unbuffered text pipe; returns the Popen (for tests that signal or read a run while it goes)."""
    return subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def assert_session_ends(sid: int, within_s: float = 30) -> None:
    """Every process of the session `sid` (a started script's: its Ray and actors, its ranks) is
    gone within `within_s`."""
    def session():
        return subprocess.run(["ps", "-o", "pid=", "-s", str(sid)], capture_output=True,
                              text=True).stdout.split()

    deadline = time.time() + within_s
    while session() and time.time() < deadline:
        time.sleep(1)
    assert session() == [], f"processes of the run outlived it: {session()}"


def load_module(path, name: str):
    """A script (its name may hold dashes) loaded as a module, without running its main()."""
    from es_llm.tasks import load_python_file

    return load_python_file(path, name)


def read_until(proc, prefix: str) -> list:
    """The lines a started script prints up to the first that starts with `prefix` (fails if the
    script ends first)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"the run ended before printing {prefix!r}:\n" + "".join(lines))


PYTHON = sys.executable


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes() -> list:
    """`accelerate launch` of 2 processes on this machine (gloo), at a port of their own: tests
    may run side by side (pytest-xdist)."""
    return ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--machine_rank", "0", "--main_process_port", str(free_port()), "--mixed_precision",
            "no", "--dynamo_backend", "no"]


def fake_checkpoint(run: Path, iteration: int, finished=False) -> Path:
    """A small checkpoint (or finished run) as the trainers write one, its weights a placeholder."""
    from safetensors.torch import save_file

    from es_llm import checkpoint as ckpt

    directory = run if finished else run / f"{ckpt.CHECKPOINT_PREFIX}{iteration}"
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(directory / "model.safetensors"))
    ckpt.write_metrics(directory / ckpt.METRICS_FILE, [{"iteration": i} for i in range(1, iteration + 1)])
    ckpt.write_json_atomic(directory / ckpt.STATE_FILE, {"iteration": iteration, "finished": finished,
                                                         "rng_state": None, "config": {}})
    return directory
