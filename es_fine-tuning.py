"""ES fine-tuning on your own task: --task PATH.py (README, "Your own task"; examples/).

Launch:  python es_fine-tuning.py --task examples/word_count_task.py --model_name bundled
    or:  accelerate launch --num_processes 4 --num_machines 1 --machine_rank 0 \
             es_fine-tuning.py --task my_task.py --gpu_threads 2
"""
import sys

from es_llm.cli import build_parser, run_training

# Experiment constants (the paper's values); the flags default to them.
NUM_ITERATIONS = 1000
POPULATION_SIZE = 30
SIGMA = 0.001
ALPHA = 0.0005
max_new_tokens = 100
do_sample = False
initial_seed = 33
NOISE_MODE = "correlated"
REWARD_ON_PROMPT_AND_RESPONSE = False


def main():
    args = build_parser(__doc__, globals()).parse_args()
    if not args.task_file:
        sys.exit("error: give your task with --task PATH.py (a file defining reward() and DATASET "
                 "or load_dataset(); see examples/)")
    run_training(args, None)


if __name__ == "__main__":
    main()
