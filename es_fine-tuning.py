"""ES fine-tuning on your own task: --task PATH.py (README, "Your own task"; examples/).

Launch:  python es_fine-tuning.py --task examples/word_count_task.py --model_name bundled
    or:  accelerate launch --num_processes 4 --num_machines 1 --machine_rank 0 \
             es_fine-tuning.py --task my_task.py --gpu_threads 2
"""
import sys

from es_llm.cli import PAPER_CONSTANTS, build_parser, run_training

# Experiment constants: the paper's conciseness values; edit them here, or override them with flags.
CONSTANTS = dict(PAPER_CONSTANTS)


def main():
    args = build_parser(__doc__, CONSTANTS).parse_args()
    if not args.task_file:
        sys.exit("error: give your task with --task PATH.py (a file defining reward() and DATASET "
                 "or load_dataset(); see examples/)")
    run_training(args, None)


if __name__ == "__main__":
    main()
