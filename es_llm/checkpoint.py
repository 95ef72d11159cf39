"""A saved run, in one place: how checkpoints, the final model and metrics.jsonl are written, and
how they are found, read and checked (es_llm/rundir.py holds the rules for what may be written
where).

Everything is written under a temporary name and renamed into place, so a crash during a save
leaves the previous checkpoint intact and loadable; a save that cannot be written (a full disk)
is a WriteError naming the path, its temporary removed.

A checkpoint directory `checkpoint-<iteration>/` holds the model and tokenizer (loadable with
`from_pretrained`), `trainer_state.json` (iteration, numpy seed-generator state, the run's
configuration), `metrics.jsonl` (every iteration so far), with fp32 master weights
`master_weights.safetensors`, and with a torch.optim optimizer its state_dict, `optimizer.pt`.
"""
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open
import torch
from safetensors.torch import load_file, save_file

from .models import save_model
from .tuning import OPTIMIZER_FILE

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
            try:
                remove(tmp)
            except OSError:
                pass  # the failure being reported matters more
        if isinstance(error, WriteError):
            raise
        raise WriteError(f"could not write {path} ({_reason(error)})") from error


@contextmanager
def atomic(path: Path, unique: bool = False):
    """Write `path` (a file, or a directory) under a hidden temporary name beside it, yielded to the
    block and renamed into place when it ends (an existing directory is moved aside first and
    removed last, so a crash leaves one whole copy); a failure to write removes the temporary and
    is a WriteError naming `path`. `unique`: the temporary's name holds the process id, for
    processes that may write the same path at once (caches)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp" + (str(os.getpid()) if unique else ""))
    with saving(path, tmp):
        remove(tmp)
        yield tmp
        if tmp.is_dir():
            replace_directory(tmp, path)
        else:
            os.replace(tmp, path)


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if there."""
    if Path(path).is_dir():
        shutil.rmtree(path)
    else:
        Path(path).unlink(missing_ok=True)


def write_json_atomic(path: Path, obj) -> None:
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def write_metrics(path: Path, records) -> None:
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())


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


def _write_run_files(directory: Path, model, tokenizer, state, records, masters,
                     optimizer=None) -> None:
    save_model(model, tokenizer, directory)
    if masters is not None:
        save_file(masters, str(directory / MASTER_FILE))
    if optimizer is not None:
        torch.save(optimizer, directory / OPTIMIZER_FILE)
    write_metrics(directory / METRICS_FILE, records)
    write_json_atomic(directory / STATE_FILE, state)


def save_checkpoint(output_dir: Path, model, tokenizer, state: dict, records, masters=None,
                    keep: int = 0, optimizer=None) -> Path:
    """Write checkpoint-<iteration>/ atomically; keep only the newest `keep` if keep > 0.
    `optimizer`: the optimizer's state_dict, or None (sgd)."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{state['iteration']}"
    with atomic(final) as tmp:
        tmp.mkdir(parents=True)
        _write_run_files(tmp, model, tokenizer, state, records, masters, optimizer)
    if keep > 0:
        for stale in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale)
    return final


def save_final(output_dir: Path, model, tokenizer, state: dict, records, masters=None,
               also=None, optimizer=None) -> None:
    """The final model goes directly into output_dir; trainer_state.json (finished) is written last.
    `also(directory)` writes more into the final files' directory after the model (a merged model)."""
    tmp = output_dir / ".final.tmp"
    with saving(output_dir, tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_run_files(tmp, model, tokenizer, state, records, masters, optimizer)
        if also is not None:
            also(tmp)
        names = sorted(p.name for p in tmp.iterdir() if p.name != STATE_FILE) + [STATE_FILE]
        for name in names:
            if (tmp / name).is_dir():  # a directory (merged_model/) replaces one left there
                remove(output_dir / name)
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


def load_optimizer(checkpoint: Path, optimizer: str = "sgd"):
    """The optimizer state_dict a checkpoint saved, or None for an sgd run (which saves none); a
    run of another optimizer whose checkpoint lacks it, or holds a damaged one, is refused."""
    path = Path(checkpoint) / OPTIMIZER_FILE
    if optimizer == "sgd":
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # missing, truncated, or not a state_dict
        raise _unreadable(checkpoint, path, error) from error


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


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run."""


def iteration_of(directory: Path) -> int:
    return int(load_state(directory)["iteration"])


def finished_state(run_dir: Path):
    """The directory's own trainer_state.json if it records a finished run, else None."""
    if not (Path(run_dir) / STATE_FILE).is_file():
        return None
    state = load_state(run_dir)
    return state if state.get("finished") else None


def weights_dir(checkpoint: Path) -> Path:
    """Where a checkpoint's HF weights are: in it, or in a finished run's final_model/."""
    own = [p for p in Path(checkpoint).glob("*.safetensors") if p.name != MASTER_FILE]
    return Path(checkpoint) if own else Path(checkpoint) / "final_model"


def run_home(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent if checkpoint.name.startswith(CHECKPOINT_PREFIX) else checkpoint


def earlier_checkpoints(checkpoint: Path) -> list:
    home = run_home(checkpoint)
    return [c for c in list_checkpoints(home) if c.resolve() != Path(checkpoint).resolve()]


def _unreadable(checkpoint: Path, path: Path, error) -> CheckpointError:
    others = earlier_checkpoints(checkpoint)
    hint = (f"resume from another checkpoint instead, e.g. --resume {others[-1]}" if others else
            "no other checkpoint of this run exists; start the run again without --resume")
    return CheckpointError(f"cannot read {path} of checkpoint {checkpoint} ({type(error).__name__}: "
                           f"{error}); the file is damaged or incomplete. Nothing was written. {hint}")


def check_readable(checkpoint: Path) -> None:
    """Open every tensor file of the checkpoint, so a damaged one is named before any work:
    safetensors checks the header and that the file covers every tensor it lists (a truncated file
    fails), without reading the tensors, which the model load then reads once."""
    files = sorted(weights_dir(checkpoint).glob("*.safetensors"))
    files += [p for p in [Path(checkpoint) / MASTER_FILE] if p.is_file() and p not in files]
    for path in files:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as error:  # safetensors raises its own SafetensorError, or OSError
            raise _unreadable(checkpoint, path, error) from error


def load_resume(path, mismatches, num_iterations: int) -> dict:
    """The checkpoint to resume from (a checkpoint-<i>/ directory, or a run directory meaning its
    newest state), checked before any work: `mismatches(saved_config)` lists the settings on which
    it differs from this run; its iteration must leave work to do. (`check_readable` then reads its
    tensors through.)"""
    checkpoint = resolve_checkpoint(path)
    try:
        state = load_state(checkpoint)
        start = int(state["iteration"])
        records = [r for r in read_metrics(checkpoint / METRICS_FILE) if r["iteration"] <= start]
    except (ValueError, KeyError, TypeError) as error:
        raise _unreadable(checkpoint, checkpoint / STATE_FILE, error) from error
    mismatched = mismatches(state.get("config", {}))
    if mismatched:
        raise ValueError(f"cannot resume from {checkpoint}: its run differs from this one:\n  "
                         + "\n  ".join(mismatched) + "\nRun with the checkpoint's settings, or "
                         "start a new run without --resume.")
    if start >= num_iterations:
        raise ValueError(f"{checkpoint} is at iteration {start}: --num_iterations "
                         f"{num_iterations} leaves nothing to do; give a larger --num_iterations "
                         f"to continue the run")
    if not weights_dir(checkpoint).is_dir():
        raise FileNotFoundError(f"{checkpoint} holds no weights (neither *.safetensors nor "
                                f"final_model/); resume from another checkpoint")
    if [r["iteration"] for r in records] != list(range(1, start + 1)):
        raise CheckpointError(f"{checkpoint / METRICS_FILE} does not hold iterations 1..{start}; "
                              f"the checkpoint is incomplete, resume from another one")
    return {"checkpoint": checkpoint, "state": state, "start": start, "records": records,
            "home": run_home(checkpoint)}
