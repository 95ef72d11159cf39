"""The accelerated version (es_fine-tuning_countdown_accl.py): one inference engine per GPU, each
a Ray actor; seeds go out to the engines, rewards come back, the update runs on engine 0 and is
broadcast to the others. The loop itself is es_llm/loop.py, as for every trainer.

    trainer.py      the run: its directory and published saves, the pool evaluator the loop calls
                    (PoolEvaluator), and train_accelerated
    pool.py         one Ray actor per engine, placement groups, seeds handed to free engines,
                    the update on engine 0 and the broadcast
    engines.py      one small engine interface, a transformers engine and a vLLM engine behind it;
                    each keeps its weights' operations in `engine.weights` (es_llm.weightset)
    vllm_worker.py  the vLLM worker extension: those operations inside a vLLM worker, on the
                    weights the engine really computes with (CPU prepacked linear layers included);
                    vLLM loads it by its published path, utils.worker_extn

HF layouts, HF directories from a state dict and the base model every engine loads are in
es_llm/hf_weights.py (the GRPO baseline and eval_countdown_vllm.py use them too).
"""
