"""A run directory's rules, shared by every trainer: what may be written where, and one run through
its directory (`Run`). Reading and checking saved runs is es_llm/checkpoint.py's.

- `plan_run_dir` decides whether this run may write into a directory: a new run needs one that holds
  no run (or --overwrite); a resumed run continuing in its own directory must not mix two histories;
  a resumed run going to another directory needs that one free of runs (or --overwrite). It writes
  nothing: `clear_and_check_writable` does, once every check has passed.
"""
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from . import checkpoint as ckpt
from .checkpoint import (CHECKPOINT_PREFIX, MASTER_FILE, METRICS_FILE, STATE_FILE, check_readable,
                         finished_state, iteration_of, load_resume, weights_dir)
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGED_DIR
from .tracking import PROJECT
from .tuning import OPTIMIZER_FILE

# The names a trainer writes into a run directory (what makes it "hold a run", and what
# --overwrite may remove): its files, and the trackers' directories (es_llm.tracking: TensorBoard
# under PROJECT/, wandb under wandb/, an --es_params lora run's adapter and merged model); a model
# saved in place adds its config, weights and tokenizer.
# A save's temporary is the same name behind a dot (es_llm.checkpoint.atomic).
_WRITTEN = (CHECKPOINT_PREFIX, "final_model", "model_saves", METRICS_FILE, STATE_FILE, MASTER_FILE,
            MERGED_DIR, ADAPTER_CONFIG, ADAPTER_WEIGHTS, OPTIMIZER_FILE)
RUN_FILE_PREFIXES = (*_WRITTEN, *(f".{name}" for name in _WRITTEN), ".final", PROJECT, "wandb")


def run_files(run_dir: Path) -> list:
    """What a trainer wrote into run_dir (empty when it holds no run)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name.startswith(RUN_FILE_PREFIXES))


def plan_run_dir(run_dir: Path, resume, overwrite: bool, name_flag: str) -> list:
    """Check that this run may write into run_dir; returns what --overwrite removes there.

    `resume` is what `load_resume` returned (None for a new run); `name_flag` is the flag that
    chooses another directory (named in the errors). Writes nothing."""
    run_dir = Path(run_dir)
    existing = run_files(run_dir)
    finished = finished_state(run_dir)
    own = resume is not None and run_dir.resolve() == Path(resume["home"]).resolve()
    if not own:
        if existing and not overwrite:
            what = "another run" if resume is not None else "a run"
            if finished:
                raise FileExistsError(
                    f"{run_dir} already holds a finished run ({finished['iteration']} iterations);"
                    f" pass --overwrite to replace it, --resume {run_dir} with a larger "
                    f"--num_iterations to continue it, or choose another {name_flag}")
            latest = ckpt.list_checkpoints(run_dir)
            if not latest:
                raise FileExistsError(
                    f"{run_dir} already holds {what}, unfinished and without a checkpoint (nothing "
                    f"to resume); pass --overwrite to start again there, or choose another "
                    f"{name_flag}")
            raise FileExistsError(
                f"{run_dir} already holds an unfinished run (latest checkpoint: "
                f"{latest[-1].name}); pass --resume {run_dir} to continue it, --overwrite to "
                f"replace it, or choose another {name_flag}")
        return existing
    start = resume["start"]
    later = [c for c in ckpt.list_checkpoints(run_dir) if iteration_of(c) > start]
    if finished and int(finished["iteration"]) > start:
        later += [run_dir / name for name in (STATE_FILE, MASTER_FILE, OPTIMIZER_FILE,
                                              "final_model", "final_model.pth", MERGED_DIR)
                  if (run_dir / name).exists()]
        later += sorted((run_dir / "model_saves").glob("final_model_iteration_*"))
    if later and not overwrite:
        raise FileExistsError(
            f"{run_dir} has gone past iteration {start} of {resume['checkpoint']} ("
            + ", ".join(p.name for p in later) + "): continuing from there would mix two "
            f"histories. Pass --overwrite to remove the later ones, resume from the latest "
            f"(--resume {run_dir}), or give {name_flag} to continue in a new directory")
    return later


def clear_and_check_writable(run_dir: Path, remove, name_flag: str) -> None:
    """Remove what plan_run_dir allowed (the finished marker first: a crash half-way must not leave
    a run that looks finished), then prove the directory writable."""
    remove_paths(remove)
    ensure_writable(Path(run_dir), name_flag)


def remove_paths(paths) -> None:
    """Remove files and directories, the finished marker first."""
    for path in sorted(paths, key=lambda p: p.name != STATE_FILE):
        ckpt.remove(path)


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


def resume_command(argv, run_dir: Path) -> str:
    """This run's command line with --resume RUN_DIR in place of any --resume / --overwrite."""
    kept, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not (arg.startswith("--resume=") or arg == "--overwrite"):
            kept.append(arg)
    return shlex.join(["python", argv[0], *kept, "--resume", str(run_dir)])


def resume_note(run_dir: Path) -> str:
    """Where a run that stopped on an error can go on from: its last complete checkpoint and the
    command that resumes it, or that there is none yet."""
    latest = ckpt.list_checkpoints(run_dir)
    if not latest:
        return ("no checkpoint yet (--save_every N saves one every N iterations): the run must "
                "start again")
    return (f"the last complete checkpoint is {latest[-1]}.\nResume with:\n  "
            f"{resume_command(sys.argv, run_dir)}\n(launched with accelerate launch: the same "
            f"launch command plus --resume {run_dir})")


class RunFailed(ValueError):
    """A run stopped by an error the user can act on (a reward that broke its contract, a save
    that could not be written): the error, then where the run can go on from."""


class Run:
    """One run directory through a run: opened (every check, before the model loads), begun (after
    it loads: what --overwrite removes goes, metrics.jsonl starts), then one record per iteration,
    checkpoints, a stop that saves and prints the resume command, and the final save.

    `mismatches(saved_config)` lists the settings a checkpoint must share with this run; `log` is
    called with every record on the main process (trackers, printed lines)."""

    def __init__(self, cfg, out, name_flag: str, is_main: bool, mismatches, log=None):
        self.cfg, self.out, self.name_flag, self.is_main = cfg, Path(out), name_flag, is_main
        self.log = log or (lambda record: None)
        self.resume = load_resume(cfg.resume, mismatches, cfg.num_iterations) if cfg.resume else None
        self.remove = plan_run_dir(self.out, self.resume, cfg.overwrite, name_flag)
        if self.resume:
            check_readable(self.resume["checkpoint"])
        self.optimizer_state = (ckpt.load_optimizer(self.resume["checkpoint"], cfg.optimizer)
                                if self.resume else None)
        if is_main:
            ensure_writable(self.out, name_flag)
        self.start = self.resume["start"] if self.resume else 0
        self.records = list(self.resume["records"]) if self.resume else []
        self.rng_state = self.resume["state"]["rng_state"] if self.resume else None
        self.weights = str(weights_dir(self.resume["checkpoint"])) if self.resume else None
        self.masters = ckpt.load_masters(self.resume["checkpoint"]) if self.resume else None

    def begin(self) -> None:
        if self.is_main:
            clear_and_check_writable(self.out, self.remove, self.name_flag)
            ckpt.write_metrics(self.out / METRICS_FILE, self.records)
            if self.start:
                print(f"resuming from {self.resume['checkpoint']} at iteration {self.start}",
                      flush=True)

    def state(self, iteration: int, strategy, finished=False) -> dict:
        return {"iteration": iteration, "finished": finished, "rng_state": strategy.state(),
                "config": asdict(self.cfg)}

    def add(self, record: dict, evaluator, strategy) -> None:
        """Keep, append to metrics.jsonl, log, and checkpoint every --save_every iterations (the
        last one included, as published)."""
        self.records.append(record)
        if not self.is_main:
            return
        ckpt.append_metrics(self.out / METRICS_FILE, record)
        self.log(record)
        iteration = record["iteration"]
        if self.cfg.save_every and iteration % self.cfg.save_every == 0:
            self.checkpoint(evaluator, strategy, iteration)

    def checkpoint(self, evaluator, strategy, iteration: int) -> Path:
        model, tokenizer, masters = evaluator.saveable()
        return ckpt.save_checkpoint(self.out, model, tokenizer, self.state(iteration, strategy),
                                    self.records, masters, self.cfg.keep_checkpoints,
                                    evaluator.optimizer_state())

    def stop(self, evaluator, strategy, last: int) -> None:
        """Save the last completed iteration (if any) and print the resume command; the front
        exits 130."""
        if self.is_main:
            if last > 0:
                saved = self.out / f"{CHECKPOINT_PREFIX}{last}"
                if not (saved / STATE_FILE).exists():
                    saved = self.checkpoint(evaluator, strategy, last)
                print(f"\ninterrupted after iteration {last}: checkpoint saved to {saved}\n"
                      f"Resume with:\n  {resume_command(sys.argv, self.out)}\n"
                      f"(launched with accelerate launch: the same launch command plus --resume "
                      f"{self.out})", file=sys.stderr, flush=True)
            else:
                print("\ninterrupted before the first iteration finished: nothing to save",
                      file=sys.stderr, flush=True)
        evaluator.finish()

    def failed(self, error: Exception) -> Exception:
        """After an error stopped the run: a new run that recorded no iteration takes back what it
        wrote (so the same command can run again); the error to raise, with the resume note
        (a RunFailed for the user's errors, else `error` itself after printing the note)."""
        if not self.is_main:
            return error
        if self.resume is None and not ckpt.read_metrics(self.out / METRICS_FILE):
            try:
                remove_paths(run_files(self.out))
            except OSError:
                pass  # the error being reported matters more than what it left behind
        note = resume_note(self.out)
        if isinstance(error, (ValueError, OSError)):
            return RunFailed(f"{error}\n{note}")
        error.add_note(f"the run stopped on this error; {note}")
        return error

    def finish(self, evaluator, strategy) -> Path:
        if self.is_main:
            state = self.state(self.cfg.num_iterations, strategy, finished=True)
            evaluator.save_final(self.out, state, self.records)
            if self.records:
                first, final = self.records[0], self.records[-1]
                print(f"Mean reward: {first['reward_mean']:.4f} at iteration {first['iteration']}"
                      f" -> {final['reward_mean']:.4f} at iteration {final['iteration']}",
                      flush=True)
        evaluator.finish()
        return self.out
