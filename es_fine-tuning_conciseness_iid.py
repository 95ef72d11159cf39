"""ES fine-tuning for conciseness with iid noise: the k-th parameter tensor uses seed + k.

Identical to es_fine-tuning_conciseness.py (edit the experiment constants there) except for the noise
mode; same flags.
"""
from es_llm.cli import run_twin

def main():
    run_twin(__file__, "es_fine-tuning_conciseness.py", NOISE_MODE="iid")


if __name__ == "__main__":
    main()
