"""es_fine-tuning_countdown_accl.py, unchanged, on a reward that a tiny random model can earn.

The tests' tiny model never writes Countdown's tags, so every member would score 0, the z-scores
would all be 0 and the ES update would not move the weights. Run as this script instead, the trainer
scores each completion by its number of distinct characters (/ 10), so that rewards differ between
members and every iteration really changes the weights. Everything else (arguments, Ray, engines,
checkpoints, signals) is the real script's.
"""
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import countdown.countdown_task as countdown_task  # noqa: E402

_make_task = countdown_task.make_task


def distinct_characters(prompts, completions, **_):
    return [len(set(c)) / 10 for c in completions]


def make_task(*args, **kwargs):
    """Countdown's prompts scored by distinct_characters; its held-out task (--eval_every) too."""
    task = _make_task(*args, **kwargs)
    task.reward_fn = distinct_characters
    if task.heldout is not None:
        task.heldout = partial(varied, task.heldout)
    return task


def varied(make):
    task = make()
    task.reward_fn = distinct_characters
    return task


def main():
    """The real script's main() with make_task swapped (put back afterwards: run_main calls this
    in the tests' own process)."""
    from es_llm.tasks import load_python_file

    countdown_task.make_task = make_task
    try:
        script = load_python_file(ROOT / "es_fine-tuning_countdown_accl.py", "es_accl")
        sys.argv[0] = script.__file__
        script.main()
    finally:
        countdown_task.make_task = _make_task


if __name__ == "__main__":
    main()
