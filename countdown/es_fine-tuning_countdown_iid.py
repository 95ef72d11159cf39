"""ES fine-tuning on Countdown with iid noise: the k-th parameter tensor uses seed + k.

Identical to es_fine-tuning_countdown.py (edit the experiment constants there) except for the noise
mode; same flags.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from es_llm.cli import run_twin  # noqa: E402

def main():
    run_twin(__file__, "es_fine-tuning_countdown.py", NOISE_MODE="iid")


if __name__ == "__main__":
    main()
