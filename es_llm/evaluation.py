"""Evaluation helpers shared by the evaluation scripts: loading a trained model, generating (greedy or
sampled, several samples per prompt), per-token log-probabilities, the k3 KL estimator, summaries.

The KL of a fine-tuned model from its base model is estimated on the fine-tuned model's own sampled
responses, token by token, with the k3 estimator (MISSION.md section 2):
    ratio = p_base(y_t | x, y_<t) / p_ft(y_t | x, y_<t),   kl_t = ratio - log(ratio) - 1  (>= 0),
averaged over the response's tokens. Both models are scored at temperature 1 whatever temperature the
responses were sampled with: the KL is between the models, not between the sampling distributions.
The estimate is unbiased only for responses sampled from the fine-tuned model itself, i.e. with
temperature 1 and top_p 1 (eval_conciseness.py's defaults).
"""
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .lora import ADAPTER_CONFIG, is_adapter_dir, load_adapter
from .models import PRECISIONS, load_model, precision_of

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
AUTO_PRECISION = "auto"
MODEL_PATH_HELP = ("a trainer's output directory or checkpoint-N directory, any model "
                   "--base_model_name accepts (hub id, local directory, .gguf file, 'bundled'), a "
                   "weights file (.pth/.pt/.bin/.safetensors, HF or vLLM names) or a PEFT adapter "
                   "directory (--es_params lora) for --base_model_name")


SAMPLE_BATCH_SIZE = 4  # eval_conciseness.py's --batch_size: prompts per sampling generate call
KL_BATCH_SIZE = 32  # its --kl_batch_size
SAMPLE_SEED = 0  # its --seed


def sample_responses(model, tokenizer, prompts, num_samples: int, max_new_tokens: int,
                     seed: int = SAMPLE_SEED, batch_size: int = SAMPLE_BATCH_SIZE,
                     temperature: float = 1.0, top_p: float = 1.0, progress: bool = True) -> list:
    """eval_conciseness.py's samples: `num_samples` sampled responses per prompt, torch seeded with
    `seed` first (so the same model, prompts and settings give the same samples)."""
    torch.manual_seed(seed)
    return generate(model, tokenizer, prompts, max_new_tokens, batch_size, num_samples=num_samples,
                    do_sample=True, temperature=temperature, top_p=top_p, progress=progress,
                    desc="sampling")


def eval_parser(doc: str, base_default, base_help: str, required: bool):
    """An evaluation script's parser with its model flags: --model_path (`required`, or else the
    base model by default) and --base_model_name."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=required, default=None,
                   help=MODEL_PATH_HELP + ("" if required else " (default: the base model)"))
    p.add_argument("--base_model_name", default=base_default, help=base_help)
    return p


@dataclass
class Sample:
    """One generated response: which prompt it answers, its text and its token ids."""
    prompt_index: int
    prompt: str
    response: str
    prompt_ids: list
    response_ids: list


def saved_precision(model_path, default: str = "bf16") -> str:
    """The precision a model directory was saved in (its config.json dtype), else `default`."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return default
    values = json.loads(config.read_text())
    return precision_of(values.get("dtype") or values.get("torch_dtype") or "") or default


def load_for_eval(model_path, base_model_name, precision=AUTO_PRECISION, device=None,
                  cache_dir=None):
    """(model, tokenizer, description) for an evaluation.

    `model_path` is what a trainer saved (its output directory or a checkpoint-N directory), any
    model `load_model` accepts, a bare weights file (.pth/.pt/.bin/.safetensors state dict, with
    HF names or vLLM's fused names) applied to `base_model_name`, or a PEFT adapter directory
    (an --es_params lora run) on `base_model_name`. Without `model_path` the base model
    itself is evaluated. `precision` "auto" keeps the dtype the weights were saved in: the model
    directory's config.json dtype, a weights file's tensors' dtype (bf16 when neither says).
    """
    if is_adapter_dir(model_path):
        return load_adapter_for_eval(model_path, base_model_name, precision, device, cache_dir)
    source = model_path or base_model_name
    weights_file = model_path is not None and Path(model_path).suffix in WEIGHT_FILE_SUFFIXES
    state = None
    if weights_file:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist; give a trainer's output "
                                    f"directory, a checkpoint-N directory or an existing weights "
                                    f"file")
        state = read_state_dict(path)
    if precision == AUTO_PRECISION:
        precision = saved_precision(source) if state is None else state_precision(state)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected {AUTO_PRECISION!r} or one of "
                         f"{sorted(PRECISIONS)}")
    if state is None:
        model, tokenizer = load_model(source, precision, cache_dir, device)
        return model, tokenizer, precision
    model, tokenizer = load_model(base_model_name, precision, cache_dir, device)
    load_state_into(model, state, model_path)
    return model, tokenizer, precision


def load_adapter_for_eval(model_path, base_model_name, precision=AUTO_PRECISION, device=None,
                          cache_dir=None):
    """(model, tokenizer, precision): a PEFT adapter directory (an --es_params lora run or
    checkpoint) on its base model, unmerged, as it was trained. "auto" precision: the one its
    trainer recorded, else the base model's."""
    if precision == AUTO_PRECISION:
        precision = _recorded_setting(Path(model_path), "precision") or saved_precision(
            base_model_name)
    model, tokenizer = load_model(base_model_name, precision, cache_dir, device)
    return load_adapter(model, model_path), tokenizer, precision


def read_state_dict(path) -> dict:
    """The tensors of a weights file saved by torch.save (optionally under "state_dict") or
    safetensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict (name -> tensor)")
    return state


def state_precision(state: dict, default: str = "bf16") -> str:
    """The precision of a state dict's first floating-point tensor (`default` if none)."""
    for tensor in state.values():
        if tensor.is_floating_point():
            return precision_of(tensor.dtype) or default
    return default


def load_state_into(model, state: dict, path="the state dict") -> None:
    """Load `state` into `model`: HF names, or vLLM's fused names (qkv_proj, gate_up_proj), which are
    split with the model's config first (es_llm.vllm_names). Names must then match exactly, except a
    tied lm_head.weight, which may be absent."""
    from .vllm_names import is_vllm_state, vllm_to_hf

    if is_vllm_state(state):
        state = vllm_to_hf(state, model.config)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    # Tied embeddings are stored once; a missing lm_head.weight is fine when it is tied.
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"weights file {path} does not match the base model's parameter names: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]}). Give the --base_model_name the weights were "
                         f"trained from (HF names and vLLM's fused qkv_proj / gate_up_proj names "
                         f"are both read)")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a shape mismatch: another architecture or size
        raise ValueError(f"weights file {path} does not fit the base model: {error}. Give the "
                         f"--base_model_name the weights were trained from") from error


DEFAULT_BASE_MODEL = "Qwen/Qwen2.5-3B-Instruct"
_RUN_NAME_MARKER = "_es_random_seed"


def _recorded_setting(directory: Path, key: str):
    """A setting the plain trainers recorded in `directory` (trainer_state.json's config)."""
    try:
        return json.loads((directory / "trainer_state.json").read_text())["config"].get(key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _trainer_model_name(directory: Path):
    """The base model a trainer recorded in `directory`: trainer_state.json's config (the plain
    trainers' outputs and checkpoints), a run config.json with a model_name (the accelerated
    trainer's run directory; an HF config.json has no model_name), or a PEFT adapter's
    adapter_config.json."""
    for name, get in (("trainer_state.json", lambda d: (d.get("config") or {}).get("model_name")),
                      ("config.json", lambda d: d.get("model_name")),
                      (ADAPTER_CONFIG, lambda d: d.get("base_model_name_or_path"))):
        file = directory / name
        if file.is_file():
            try:
                value = get(json.loads(file.read_text()))
            except (ValueError, AttributeError):
                continue
            if isinstance(value, str) and value:
                return value
    return None


def guess_base_model(model_path, default: str = DEFAULT_BASE_MODEL) -> tuple:
    """(base model, how it was found) for a model path, when --base_model_name is not given.

    In order: what a trainer recorded beside the weights (trainer_state.json, a run's config.json),
    looking in the path and up to three directories above it; a `base_model` directory beside the
    weights' directory (the published accelerated layout model_saves/{base_model,
    final_model_iteration_N/}); the model id a plain trainer's output directory name starts with
    (`<model>_es_random_seed...`); a model directory itself (it carries its own config); else
    `default`, the paper's model.
    """
    path = Path(str(model_path)).expanduser()
    start = path if path.is_dir() else path.parent
    for directory in [start, *list(start.resolve().parents)[:3]] if path.exists() else []:
        found = _trainer_model_name(directory)
        if found:
            return found, f"recorded by the trainer in {directory}"
    if path.suffix in WEIGHT_FILE_SUFFIXES:
        for directory in (path.parent, path.parent.parent):
            sibling = directory / "base_model"
            if (sibling / "config.json").is_file():
                return str(sibling), "the base_model directory beside the weights"
    text = str(model_path)
    if _RUN_NAME_MARKER in text:
        prefix = text[:text.index(_RUN_NAME_MARKER)]
        if Path(prefix).expanduser().exists():
            return prefix, "the start of the run directory's name"
        parts = [p for p in prefix.split("/") if p]
        return "/".join(parts[-2:]) if len(parts) >= 2 else (parts[-1] if parts else default), \
            "the start of the run directory's name"
    if path.is_dir() or path.suffix == ".gguf" or text == "bundled":
        return text, "the model path itself (it holds its own architecture)"
    if path.suffix not in WEIGHT_FILE_SUFFIXES:
        return text, "the model path itself (a hub id)"
    return default, "nothing recorded beside the weights: the paper's model"


def _generate_kwargs(model, tokenizer, do_sample, temperature, top_p) -> dict:
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    kwargs = {"do_sample": do_sample, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos}
    if do_sample:
        # top_k = 0 switches off the library's default top-50 cut: only temperature and top_p apply.
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def _eos_ids(model, tokenizer) -> set:
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos])


def _trim_after_eos(ids: list, eos: set) -> list:
    """The response's tokens up to and including its first end-of-sequence token."""
    for i, token in enumerate(ids):
        if token in eos:
            return ids[:i + 1]
    return ids


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 8,
             num_samples: int = 1, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, progress: bool = True, desc: str = "generating") -> list:
    """`num_samples` responses to every prompt (prompt-major order), as `Sample`s.

    Greedy decoding uses exactly the trainer's settings (es_llm.generation.Generator), so the same
    prompts in the same batches give the same responses as during training.
    """
    if num_samples > 1 and not do_sample:
        raise ValueError(f"{num_samples} samples per prompt need sampling (do_sample); greedy "
                         f"decoding gives the same response every time")
    kwargs = _generate_kwargs(model, tokenizer, do_sample, temperature, top_p)
    eos = _eos_ids(model, tokenizer)
    samples = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        batch_prompts = list(prompts[start:start + batch_size])
        batch = tokenizer(batch_prompts, return_tensors="pt", padding=True).to(model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens,
                             num_return_sequences=num_samples, **kwargs)
        width = batch["input_ids"].shape[1]
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for row, text in enumerate(texts):
            p = row // num_samples
            mask = batch["attention_mask"][p].bool()
            samples.append(Sample(start + p, batch_prompts[p], text,
                                  batch["input_ids"][p][mask].tolist(),
                                  _trim_after_eos(out[row, width:].tolist(), eos)))
    return samples


@torch.inference_mode()
def response_log_probs(model, samples, batch_size: int = 16, pad_token_id: int = 0) -> list:
    """Per-token log p(response token | prompt, previous tokens) under `model`, one float32 tensor per
    sample (temperature 1). Sequences are left-padded; positions follow the attention mask."""
    result = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        seqs = [s.prompt_ids + s.response_ids for s in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       position_ids=positions.to(model.device)).logits
        for i, sample in enumerate(chunk):
            n = len(sample.response_ids)
            if n == 0:
                result.append(torch.zeros(0))
                continue
            # Logits at position t predict token t + 1: the response's n tokens are the last n.
            row = logits[i, width - n - 1:width - 1].float().log_softmax(-1)
            targets = ids[i, width - n:].to(row.device)
            result.append(row.gather(-1, targets[:, None])[:, 0].cpu())
    return result


def k3_kl(logp_ft: torch.Tensor, logp_base: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(ft || base): ratio - log(ratio) - 1 with ratio = p_base / p_ft."""
    log_ratio = logp_base.double() - logp_ft.double()
    return torch.expm1(log_ratio) - log_ratio


def per_sample_kl(model, base_model, samples, batch_size: int = 16, pad_token_id: int = 0) -> list:
    """Mean per-token k3 KL of `model` from `base_model` on each sample's response tokens."""
    ft = response_log_probs(model, samples, batch_size, pad_token_id)
    base = response_log_probs(base_model, samples, batch_size, pad_token_id)
    return [float(k3_kl(a, b).mean()) if len(a) else 0.0 for a, b in zip(ft, base)]


def summarize(values) -> dict:
    """mean, std (population), min, max and count of a list of numbers."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "count": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "max": float(v.max()), "count": int(v.size)}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def argument_problems(args, positive=(), sampling: bool = True) -> list:
    """What is wrong with an evaluation's flags: counts below 1, sampling settings out of range."""
    problems = [f"--{k} must be >= 1 (got {getattr(args, k)})" for k in positive
                if getattr(args, k) < 1]
    if sampling and not (args.temperature > 0 and 0 < args.top_p <= 1):
        problems.append(f"sampling needs --temperature > 0 and 0 < --top_p <= 1 "
                        f"(got {args.temperature}, {args.top_p})")
    return problems


def run_evaluation(evaluate, args, problems) -> None:
    """Exit with the problems, or run `evaluate(args)`; a user error exits with its message."""
    from .models import ModelNotFoundError

    if problems:
        sys.exit("error: " + "; ".join(problems))
    try:
        evaluate(args)
    except (ValueError, FileNotFoundError, ModelNotFoundError) as error:
        sys.exit(f"error: {error}")
