"""Peak RSS of a plain trainer's run from its evaluator on (docs/lora_es.md), the model loaded.

    python bench/peak_rss.py es_fine-tuning_conciseness.py --model_name bundled ...

Runs the script in this process. When the trainer builds its evaluator (the model loaded, the
population not yet built) the process's peak RSS is reset (Linux: /proc/self/clear_refs), and the
RSS then is printed; at the end the peak since then. Lines on stderr, starting with PEAK. The
reset also lowers what /usr/bin/time reports as the process's maximum.
"""
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from es_llm import trainer  # noqa: E402


def status_mib(key: str) -> int:
    """A /proc/self/status value (kB) in MiB: VmRSS now, VmHWM the peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    raise KeyError(key)


def main() -> None:
    build = trainer.LocalEvaluator.__init__

    def reset_then_build(self, *args, **kwargs):
        Path("/proc/self/clear_refs").write_text("5")
        print(f"PEAK rss_at_start_MiB={status_mib('VmRSS')}", file=sys.stderr, flush=True)
        build(self, *args, **kwargs)

    trainer.LocalEvaluator.__init__ = reset_then_build
    script, sys.argv = sys.argv[1], sys.argv[1:]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        print(f"PEAK hwm_since_start_MiB={status_mib('VmHWM')} "
              f"rss_end_MiB={status_mib('VmRSS')}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
