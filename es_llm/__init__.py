"""Evolution strategies for fine-tuning language models: the shared core of every trainer script.

Layout (each file does one thing):
    noise.py       seeded Gaussian noise, perturb / restore, fp32 master weights
    strategy.py    reward normalisation and the ES update (pure functions of weights, seeds, rewards)
    tasks.py       a task is prompts + per-prompt columns + a reward function
    generation.py  greedy batched generation of the continuation
    models.py      loading (hub id, local dir, .gguf, the bundled SmolLM2) and saving
    hf_weights.py  HF parameter layout, HF directories from a state dict, the base model engines load
    checkpoint.py  atomic saves, checkpoints, metrics.jsonl
    trainer.py     the population loop across processes and threads
    cli.py         the flags every trainer script shares
"""
