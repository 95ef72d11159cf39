"""Evolution strategies for fine-tuning language models: the shared core of every trainer script.

Layout (each file does one thing):
    loop.py         the ES loop, one for every trainer: ask, evaluate, tell, update, record, stop
    strategy.py     the population's seeds (ask) and the update terms (tell); the published update
    shaping.py      z-scores as published, centered ranks, antithetic pairs
    noise.py        seeded Gaussian noise per tensor (correlated / iid), fp32 master weights
    tuning.py       the optimizer on the ES gradient, the lr schedule, the prompt mini-batch sampler
    lowrank.py      low-rank noise: the whole population in batched generate calls
    weightset.py    WeightSet, the one class that perturbs, restores and updates weights
    trainer.py      the plain trainers' evaluator: processes (accelerate) and thread copies
    config.py       the settings, each a dataclass field with its default and help
    cli.py          the flags every trainer script shares, built from the settings' fields
    tasks.py        a task is prompts + per-prompt columns + a reward function (its contract checked)
    generation.py   greedy batched generation of the continuation
    models.py       loading (hub id, local dir, .gguf, the bundled SmolLM2) and saving
    hf_weights.py   HF parameter layout, HF directories from a state dict, the base model engines load
    attention.py    SDPA reading the shared key/value heads in place on CPU (bit-identical)
    checkpoint.py   a saved run: atomic saves, and finding, reading and checking checkpoints
    rundir.py       what may be written where, and one run through its directory
    tracking.py     experiment trackers (accelerate's: TensorBoard, wandb)
    evaluation.py   what the evaluation scripts share: a trained model in any form onto its base
    vllm_names.py   vLLM's fused parameter names to HF's and back
"""
