"""Experiment tracking through accelerate's tracker API: the same scalars from every trainer.

`--report_to tensorboard|wandb|all|none` (default tensorboard) and `--logging_dir` (default the run's
output directory). Each iteration logs, at step = iteration index from 0 (as the published
accelerated script does), the published TensorBoard tags and ours beside them. wandb honours
WANDB_MODE=offline (no network needed; `wandb sync` uploads later).
"""
from accelerate import Accelerator

REPORT_TO = ("tensorboard", "wandb", "all", "none")
PROJECT = "es_llm"
# tag -> metrics.jsonl field; the first seven are the published accelerated script's tags.
TAGS = {"reward/mean": "reward_mean", "reward/std": "reward_std", "reward/min": "reward_min",
        "reward/max": "reward_max", "time/perturbation_application": "time_noise_s",
        "time/broadcast": "time_broadcast_s", "time/iteration": "time_s",
        "time/generate": "time_generate_s", "time/update": "time_update_s",
        "time/evaluate": "time_evaluate_s", "generations": "generations",
        "heldout/reward_mean": "heldout_reward_mean",
        "heldout/kl_mean": "heldout_kl_mean", "time/heldout": "time_heldout_s"}


def trackers(report_to: str) -> list:
    if report_to not in REPORT_TO:
        raise ValueError(f"--report_to must be one of {REPORT_TO} (got {report_to!r})")
    return {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])


def tracking_accelerator(report_to: str, logging_dir, **kwargs) -> Accelerator:
    """An Accelerator that logs to the chosen trackers under `logging_dir`."""
    return Accelerator(log_with=trackers(report_to) or None, project_dir=str(logging_dir), **kwargs)


def start(accelerator: Accelerator, config: dict, logging_dir) -> None:
    """Open the trackers (main process) with the run's settings as their configuration."""
    if not accelerator.log_with:
        return
    flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
    accelerator.init_trackers(PROJECT, config=flat,
                              init_kwargs={"wandb": {"dir": str(logging_dir)}})


def finish_trackers(accelerator: Accelerator) -> None:
    """Close the trackers, and nothing else: accelerate's end_training() also destroys the default
    torch.distributed group, which a driver that never made one (the accelerated version) must
    leave to its owner (a vLLM engine in the same process, a notebook's own group)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def log(accelerator: Accelerator, record: dict) -> None:
    if accelerator.log_with:
        accelerator.log({tag: record[key] for tag, key in TAGS.items() if key in record},
                        step=record["iteration"] - 1)
