"""Shared fixtures: a tiny Llama built from a config (never downloaded) with the bundled tokenizer."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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


def build_tiny_model(directory, tokenizer_dir, seed=0, dtype=torch.float32):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
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


def run_main(args) -> None:
    """A command line (a list, as for run_script) run in this process: the script's main() with
    sys.argv set, so the test pays no new interpreter, imports or model conversion. For command
    lines that are not themselves the point (reference runs); fails unless it exits 0."""
    from unittest import mock

    script = Path(args[1]) if Path(args[1]).is_absolute() else ROOT / args[1]
    module = load_module(script, f"main_{script.stem.replace('-', '_')}")
    with mock.patch.object(sys, "argv", [str(script), *map(str, args[2:])]):
        try:
            module.main()
        except SystemExit as leaving:
            assert leaving.code in (0, None), f"{args} exited {leaving.code}"


def start_script(args, cwd=ROOT):
    """Start a command line (a list) in its own process group, stdout and stderr merged into one
    unbuffered text pipe; returns the Popen (for tests that signal or read a run while it goes)."""
    return subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


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
