"""The accelerated trainer's engines (es_fine-tuning_countdown_accl.py, eval_countdown_vllm.py).

    engines.py      one small engine interface, a transformers engine and a vLLM engine behind
                    it, and the weight operations both share (perturb, restore, update,
                    broadcast, save, load)
    worker_extn.py  the vLLM worker extension: those operations inside a vLLM worker, on the weights
                    the engine really computes with (CPU prepacked linear layers included)
    engine_pool.py  one Ray actor per engine, placement groups, seeds handed to free engines
"""
