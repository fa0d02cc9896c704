"""``wspo-kernels train`` and ``wspo-kernels precompute``: WSPO on real models, from the official recipe's YAML.

    wspo-kernels precompute CONFIG.yaml [key=value ...]   # run the frozen models once (a fingerprinted cache)
    wspo-kernels train CONFIG.yaml [key=value ...]        # reuse or make that cache, train with no frozen model resident

The keys and their defaults: ``wspo-kernels train --help`` (``config.py``).  In order:
1. the config is validated; nothing is loaded before it passes;
2. the tokenizer and the dataset are read and tokenised once (``cutoff_len`` capped at the models'
   context; rows cut and rows left without a response token are counted, the latter dropped);
3. the seed is set (before any model or adapter is built, as the official parser does);
4. the frozen models' logps come from ``output_dir/precomputed`` when it was made for exactly these
   models and rows (checked from the checkpoint files: no model is loaded), else they are computed;
5. the policy is loaded (under bf16 its trainable parameters are kept in fp32 unless ``pure_bf16``, as
   the official ``init_adapter`` does; LoRA through PEFT), trained, and saved to ``output_dir``.
"""
import hashlib
import os

import torch

from .config import ConfigError, format_help, parse_config  # noqa: F401  (re-exported for the CLI)
from .data import IGNORE_INDEX, WSPODataCollator, build_example, encode_prompt_response
from .formats import prompt_response, read_records
from .model_io import context_limit

ROLE_KEYS = {"ref": "ref_model", "weak_aligned": "weak_aligned_model", "weak_base": "weak_base_model"}
SAMPLE_BYTES = 1 << 20  # bytes hashed at the start, middle and end of each checkpoint file


def _say(message):
    print(f"wspo-kernels: {message}", flush=True)


def _local(name):
    """Local paths made absolute (LoRA adapters record it as their base model); Hub ids unchanged."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def _dtype(training):
    return torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32


def _load_model(name, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(_local(name), dtype=dtype)


def _sources(w):
    """Where each frozen model comes from; the reference defaults to the policy's initial weights."""
    return {"ref": w.ref_model or w.model_name_or_path, "weak_aligned": w.weak_aligned_model,
            "weak_base": w.weak_base_model}


def _context_limit(name):
    from transformers import AutoConfig
    return context_limit(AutoConfig.from_pretrained(_local(name)))


def effective_cutoff(w):
    """``cutoff_len``, capped at the shortest context of the four models (rows are never fed longer)."""
    names = {"model_name_or_path": w.model_name_or_path, **{k: getattr(w, k) for k in ROLE_KEYS.values()}}
    limits = {k: _context_limit(n) for k, n in names.items() if n}
    key, limit = min(((k, v) for k, v in limits.items() if v), key=lambda kv: kv[1], default=(None, None))
    if limit is not None and w.cutoff_len > limit:
        _say(f"cutoff_len {w.cutoff_len} exceeds the context of {key} ({limit} positions): rows are cut to {limit}")
        return limit
    return w.cutoff_len


def prepare_dataset(w, tokenizer, cutoff):
    """Tokenised {input_ids, labels} rows: cut to ``cutoff`` by ``w.truncation``; rows without a response
    token dropped; both counted."""
    from datasets import Dataset
    records = read_records(w.dataset)
    if w.max_samples is not None:
        records = records[: w.max_samples] if isinstance(records, list) else records.select(range(min(len(records), w.max_samples)))
    rows, cut, dropped = [], 0, 0
    if isinstance(records, Dataset) and {"input_ids", "labels"} <= set(records.column_names):  # pre-tokenised
        for r in records:
            ids, labels = list(r["input_ids"]), list(r["labels"])
            cut += len(ids) > cutoff
            ids, labels = ids[:cutoff], labels[:cutoff]
            if all(y == IGNORE_INDEX for y in labels[1:]):
                dropped += 1
            else:
                rows.append({"input_ids": ids, "labels": labels})
    else:
        chat = False if w.template == "plain" else None
        if w.template not in ("auto", "plain") and not getattr(tokenizer, "chat_template", None):
            _say(f"template {w.template!r}: the tokenizer has no chat template; prompts are plain text")
        for i, record in enumerate(records):
            prompt_ids, response_ids = encode_prompt_response(tokenizer, *prompt_response(record, i), chat_template=chat)
            cut += len(prompt_ids) + len(response_ids) > cutoff
            row = build_example(prompt_ids, response_ids, max_length=cutoff, truncation=w.truncation)
            if row is None:
                dropped += 1
            else:
                rows.append(row)
    _say(f"{len(rows)} examples from {w.dataset}; {cut} cut to {cutoff} tokens ({w.truncation}); {dropped} dropped "
         "(no response token within the cutoff)")
    if not rows:
        raise ConfigError(f"dataset {w.dataset!r}: no example keeps a response token within {cutoff} tokens")
    return Dataset.from_list(rows)


def _snapshot_dir(name):
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not in the Hub cache (yet)
        return None


def checkpoint_fingerprint(name, dtype):
    """A model's identity from its checkpoint files (config, weights: sizes and sampled bytes) and the
    dtype it runs in; None when the files are not on this machine."""
    path = _snapshot_dir(name)
    if path is None:
        return None
    h = hashlib.sha256(str(dtype).encode())
    for file in sorted(os.listdir(path)):
        if file == "config.json" or file.endswith((".safetensors", ".bin", ".pt", ".pth")):
            full = os.path.join(path, file)
            size = os.path.getsize(full)
            h.update(f"{file}:{size}".encode())
            with open(full, "rb") as f:
                for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
                    f.seek(offset)
                    h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def precomputed_dataset(config, tokenizer, ds):
    """``ds`` with the frozen models' logps columns: from the cache when it matches, else computed."""
    from .precompute import load_cached_logps, precompute_logps
    w, dtype = config.wspo, _dtype(config.training)
    cache = os.path.join(config.training.output_dir, "precomputed")
    sources = _sources(w)
    ids = {role: checkpoint_fingerprint(_local(name), dtype) for role, name in sources.items()}
    if all(ids.values()):
        cached = load_cached_logps(ds, cache, model_ids=ids)
        if cached is not None:
            _say(f"reusing the precomputed logps in {cache} (same models, dtype and rows)")
            return cached
    device = "cpu" if config.training.use_cpu or not torch.cuda.is_available() else "cuda"
    models = {role: _load_model(name, dtype).to(device) for role, name in sources.items()}
    ids = {role: ids[role] or checkpoint_fingerprint(_local(name), dtype) for role, name in sources.items()}
    out = precompute_logps(ds, ref_model=models["ref"], weak_aligned_model=models["weak_aligned"],
                           weak_base_model=models["weak_base"], batch_size=w.precompute_batch_size, output_dir=cache,
                           pad_token_id=tokenizer.pad_token_id, model_ids=ids if all(ids.values()) else None,
                           log=_say)
    _say(f"precomputed logps for {len(out)} examples -> {cache}")
    return out


def _setup(argv, prog):
    from transformers import AutoTokenizer
    config = parse_config([argv] if isinstance(argv, str) else argv, prog=prog)
    cutoff = effective_cutoff(config.wspo)
    tokenizer = AutoTokenizer.from_pretrained(_local(config.wspo.model_name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return config, tokenizer, prepare_dataset(config.wspo, tokenizer, cutoff)


def precompute_main(argv):
    config, tokenizer, ds = _setup(argv, "wspo-kernels precompute")
    return precomputed_dataset(config, tokenizer, ds)


def _policy(w, dtype):
    policy = _load_model(w.model_name_or_path, dtype)
    if w.finetuning_type == "lora":
        from peft import LoraConfig, get_peft_model
        target = "all-linear" if w.lora_target == "all" else [t.strip() for t in w.lora_target.split(",")]
        lora = LoraConfig(r=w.lora_rank, lora_alpha=w.lora_alpha or 2 * w.lora_rank, lora_dropout=w.lora_dropout,
                          target_modules=target, task_type="CAUSAL_LM")
        return get_peft_model(policy, lora, autocast_adapter_dtype=not w.pure_bf16)  # adapters in fp32
    return policy if w.pure_bf16 else policy.float()  # trainable parameters in fp32, compute under autocast


def _plot_loss(trainer, path):
    from .demo import plot_losses
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    if losses and plot_losses(losses, path):
        _say(f"loss curve -> {path}")


def train_main(argv):
    from transformers import set_seed

    from .trainer import WSPOTrainer
    config, tokenizer, ds = _setup(argv, "wspo-kernels train")
    w, args = config.wspo, config.training
    dtype = _dtype(args)
    frozen = {}
    if w.precompute:
        ds = precomputed_dataset(config, tokenizer, ds)
    else:
        sources = _sources(w)
        if w.finetuning_type == "lora" and not w.ref_model:
            del sources["ref"]  # the reference is the policy with its adapters disabled
        frozen = {f"{role}_model": _load_model(name, dtype) for role, name in sources.items()}
    eval_ds = None
    if w.val_size > 0:
        split = ds.train_test_split(test_size=int(w.val_size) if w.val_size >= 1 else w.val_size, seed=args.seed)
        ds, eval_ds = split["train"], split["test"]
    set_seed(args.seed)  # before the policy and its adapters are built: reproducible LoRA initialisation
    policy = _policy(w, dtype)
    trainer = WSPOTrainer(policy, args, train_dataset=ds, eval_dataset=eval_ds, gamma=w.pref_beta,
                          processing_class=tokenizer, backend=w.backend, disable_dropout=w.disable_dropout,
                          data_collator=WSPODataCollator(tokenizer.pad_token_id, pad_to_multiple_of=8), **frozen)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if w.plot_loss:
        _plot_loss(trainer, os.path.join(args.output_dir, "training_loss.png"))
    what = "LoRA adapters" if w.finetuning_type == "lora" else "model"
    _say(f"{what} saved to {os.path.abspath(args.output_dir)}")
    return trainer
