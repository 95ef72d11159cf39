"""Saves that cannot be half-written: checkpoints, the final model and metrics.jsonl.

Everything is written under a temporary name and renamed into place, so a crash during a save
leaves the previous checkpoint intact and loadable.

A checkpoint directory `checkpoint-<iteration>/` holds the model and tokenizer (loadable with
`from_pretrained`), `trainer_state.json` (iteration, numpy seed-generator state, the run's
configuration), `metrics.jsonl` (every iteration so far) and, with fp32 master weights,
`master_weights.safetensors`.
"""
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .models import save_model

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
MASTER_FILE = "master_weights.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"


class WriteError(OSError):
    """A save that could not be written (a full disk, a quota, a lost permission, an I/O error):
    its message names the path and the reason; what was half-written has been removed."""


def _reason(error) -> str:
    code = getattr(error, "errno", None)
    text = os.strerror(code) if code else str(error).strip().splitlines()[-1] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextmanager
def saving(path: Path, *temporary: Path):
    """Any failure to write inside becomes one WriteError naming `path` and the reason, after
    the `temporary` files or directories are removed. (torch.save reports a failed write as a
    RuntimeError, safetensors as a SafetensorError.)"""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as error:
        for tmp in temporary:
            if Path(tmp).is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                Path(tmp).unlink(missing_ok=True)
        if isinstance(error, WriteError):
            raise
        raise WriteError(f"could not write {path} ({_reason(error)})") from error


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with saving(path, tmp):
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)


def write_metrics(path: Path, records) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with saving(path, tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def append_metrics(path: Path, record) -> None:
    """One line more; a failed write is cut off again, so the file never ends in half a line."""
    with saving(path), open(path, "a") as f:
        size = f.tell()
        try:
            f.write(json.dumps(record) + "\n")
            f.flush()
        except OSError:
            f.truncate(size)
            raise


def read_metrics(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_run_files(directory: Path, model, tokenizer, state, records, masters) -> None:
    save_model(model, tokenizer, directory)
    if masters is not None:
        save_file(masters, str(directory / MASTER_FILE))
    write_metrics(directory / METRICS_FILE, records)
    write_json_atomic(directory / STATE_FILE, state)


def save_checkpoint(output_dir: Path, model, tokenizer, state: dict, records, masters=None,
                    keep: int = 0) -> Path:
    """Write checkpoint-<iteration>/ atomically; keep only the newest `keep` if keep > 0."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{state['iteration']}"
    tmp = output_dir / f".{final.name}.tmp"
    with saving(final, tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_run_files(tmp, model, tokenizer, state, records, masters)
        replace_directory(tmp, final)
    if keep > 0:
        for stale in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale)
    return final


def save_final(output_dir: Path, model, tokenizer, state: dict, records, masters=None) -> None:
    """The final model goes directly into output_dir; trainer_state.json (finished) is written last."""
    tmp = output_dir / ".final.tmp"
    with saving(output_dir, tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_run_files(tmp, model, tokenizer, state, records, masters)
        names = sorted(p.name for p in tmp.iterdir() if p.name != STATE_FILE) + [STATE_FILE]
        for name in names:
            os.replace(tmp / name, output_dir / name)
        tmp.rmdir()


def replace_directory(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`; an existing `final` is moved aside first, then deleted."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)


def ensure_writable(directory: Path, flag: str) -> None:
    """Create `directory` and prove it writable before any work, or say which flag to change."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"directory {directory} is not writable ({error}); choose another "
                              f"{flag}") from error


def list_checkpoints(output_dir: Path) -> list:
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()
             and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory, or an output directory meaning its latest checkpoint."""
    path = Path(path)
    if (path / STATE_FILE).exists() and path.name.startswith(CHECKPOINT_PREFIX):
        return path
    # The newest state: the latest checkpoint, or the output directory's own (final) state.
    candidates = list_checkpoints(path) + ([path] if (path / STATE_FILE).exists() else [])
    if candidates:
        return max(candidates, key=lambda p: load_state(p)["iteration"])
    raise FileNotFoundError(f"--resume {path}: no checkpoint found there (expected a "
                            f"{CHECKPOINT_PREFIX}<iteration>/ directory with {STATE_FILE}, or an "
                            f"output directory holding such checkpoints)")


def load_state(checkpoint: Path) -> dict:
    path = Path(checkpoint) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path} ({error}): the file is damaged; resume from another "
                         f"checkpoint") from error


def load_masters(checkpoint: Path):
    path = checkpoint / MASTER_FILE
    return load_file(str(path)) if path.exists() else None


def load_weights(directory) -> dict:
    """{name: tensor} of the model weights saved in an HF directory (model.safetensors or its
    shards; the master weights file is not among them)."""
    files = sorted(p for p in Path(directory).glob("*.safetensors") if p.name != MASTER_FILE)
    if not files:
        raise FileNotFoundError(f"{directory} holds no model weights (*.safetensors); is it a "
                                f"checkpoint or a finished run's final_model/?")
    state = {}
    for path in files:
        state.update(load_file(str(path)))
    return state
