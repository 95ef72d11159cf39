"""ES fine-tuning for conciseness: reward answers whose length matches a short target.

Launch:  python es_fine-tuning_conciseness.py --model_name bundled
    or:  accelerate launch --num_processes 4 --num_machines 1 --machine_rank 0 \
             es_fine-tuning_conciseness.py --gpu_threads 2
"""
from es_llm.cli import build_parser, run_training
from es_llm.tasks import Task, conciseness_reward

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

PROMPTS = ["Solve: 3 + 5 =", "If all birds can fly and penguins are birds, can penguins fly?"]
TARGETS = ["8", "No"]


def main():
    args = build_parser(__doc__, globals()).parse_args()
    run_training(args, lambda: Task("conciseness", PROMPTS, conciseness_reward, {"target": TARGETS}))


if __name__ == "__main__":
    main()
