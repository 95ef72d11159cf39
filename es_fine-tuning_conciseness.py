"""ES fine-tuning for conciseness: reward answers whose length matches a short target.

Launch:  python es_fine-tuning_conciseness.py --model_name bundled
    or:  accelerate launch --num_processes 4 --num_machines 1 --machine_rank 0 \
             es_fine-tuning_conciseness.py --gpu_threads 2
"""
from es_llm.cli import build_parser, run_training
from es_llm.tasks import conciseness_task

# Experiment constants (the paper's values); the flags default to them.
NUM_ITERATIONS = 1000
POPULATION_SIZE = 30
SIGMA = 0.001
ALPHA = 0.0005
max_new_tokens = 100
do_sample = False
initial_seed = 33
NOISE_MODE = "correlated"
# True reproduces the published scripts, which score the decoded prompt plus the response: the reward
# then favours the shortest output instead of the target's length. False scores the response only.
REWARD_ON_PROMPT_AND_RESPONSE = False

# The task: two prompts ("Solve: 3 + 5 =" -> "8", the penguin question -> "No") and the reward
# minus the difference in characters to the target (es_llm/tasks.py: conciseness_task).


def main():
    args = build_parser(__doc__, globals()).parse_args()
    run_training(args, conciseness_task)


if __name__ == "__main__":
    main()
