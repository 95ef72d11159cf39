"""An example task for `--task`: answer in exactly as many words as the prompt asks for.

    python es_fine-tuning.py --task examples/word_count_task.py --model_name bundled \
        --num_iterations 10 --population_size 8 --sigma 0.01 --alpha 0.005 --max_new_tokens 24 \
        --gpu_threads 1

A task file defines `reward(completions, prompts, **columns)` returning one float per completion
(TRL's reward-function convention: it is called with keywords), and either `DATASET`, a list of
dicts each with a "prompt" key, or `load_dataset()` returning one. Every other key of a row is a
column, passed to `reward` as a list with one value per prompt (here `words`). `--data rows.jsonl`
replaces the rows. `NAME` (optional) names the task in the run's settings.
"""
NAME = "word_count"

DATASET = [
    {"prompt": "Describe the sea in exactly three words:", "words": 3},
    {"prompt": "Name a colour, in one word:", "words": 1},
    {"prompt": "Say hello in exactly five words:", "words": 5},
]


def reward(completions, prompts, words, **_):
    """Minus the distance between the first line's word count and the asked-for count."""
    counts = [len(c.strip().split("\n")[0].split()) if c.strip() else 0 for c in completions]
    return [-abs(count - target) for count, target in zip(counts, words)]
