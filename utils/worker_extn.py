"""The vLLM worker extension at its published path.

vLLM loads it by name: `LLM(..., worker_extension_cls="utils.worker_extn.WorkerExtension")`. The
extension lives in accelerated/vllm_worker.py; importing either module patches vLLM's CPU linear
layers to keep their weights, so it must happen before the model loads (vLLM imports this module
when it builds the worker, and accelerated.engines.VLLMEngine imports it earlier still).
"""
from accelerated.vllm_worker import WorkerExtension

__all__ = ["WorkerExtension"]
