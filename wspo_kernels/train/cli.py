"""``wspo-kernels train CONFIG.yaml`` and ``wspo-kernels precompute CONFIG.yaml``: WSPO on real models.

A config names models by Hub id or local path (nothing is fetched when they are local) and mirrors
the official recipe's options::

    policy: path/to/strong-base            # the strong model to train (also the reference unless `ref` is set)
    ref: null                              # strong reference; default: the policy's initial weights
    weak_aligned: path/to/weak-aligned
    weak_base: path/to/weak-base
    dataset: data.jsonl                    # {"prompt", "response"} lines, or a datasets.save_to_disk dir
    output_dir: out/
    gamma: 0.1                             # the paper's gamma = the official pref_beta
    learning_rate: 1.0e-5                  # official: 1e-5 full, 5e-6 LoRA
    num_train_epochs: 1
    cutoff_len: 4096
    per_device_train_batch_size: 1
    gradient_accumulation_steps: 8
    bf16: false
    precompute: true                       # run the frozen models once, then train with none resident
    lora: {r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}   # optional (PEFT)
"""
import json
import os

import torch

TRAIN_KEYS = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
              "bf16", "max_steps", "logging_steps", "seed", "warmup_ratio", "lr_scheduler_type", "save_strategy",
              "use_cpu")


def load_config(path):
    import yaml
    with open(path) as f:
        config = yaml.safe_load(f)
    missing = [k for k in ("policy", "weak_aligned", "weak_base", "dataset", "output_dir") if not config.get(k)]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    return config


def _load_model(name, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype)


def load_dataset_for(config, tokenizer):
    """Tokenised {input_ids, labels} rows; examples without a response token in cutoff_len are dropped, counted."""
    from datasets import Dataset, load_from_disk

    from .data import tokenize_prompt_response
    source = config["dataset"]
    if os.path.isdir(source):
        ds = load_from_disk(source)
        if "input_ids" in ds.column_names:
            return ds
        records = list(ds)
    else:
        with open(source) as f:
            records = [json.loads(line) for line in f if line.strip()]
    rows, dropped = [], 0
    for r in records:
        row = tokenize_prompt_response(tokenizer, r["prompt"], r["response"], max_length=config.get("cutoff_len"))
        if row is None:
            dropped += 1
        else:
            rows.append(row)
    if dropped:
        print(f"wspo-kernels: dropped {dropped} of {len(records)} examples with no response token within cutoff_len")
    return Dataset.from_list(rows)


def _setup(config):
    from transformers import AutoTokenizer
    dtype = torch.bfloat16 if config.get("bf16") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(config["policy"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dtype, tokenizer, load_dataset_for(config, tokenizer)


def precompute_main(config_path):
    config = load_config(config_path)
    return _precompute(config, *_setup(config))


def _precompute(config, dtype, tokenizer, ds):
    from .precompute import precompute_logps
    device = "cuda" if torch.cuda.is_available() and not config.get("use_cpu") else "cpu"
    models = {role: _load_model(config.get(key) or config["policy"], dtype).to(device)
              for role, key in (("ref_model", "ref"), ("weak_aligned_model", "weak_aligned"),
                                ("weak_base_model", "weak_base"))}
    out = precompute_logps(ds, **models, batch_size=config.get("precompute_batch_size", 8),
                           output_dir=os.path.join(config["output_dir"], "precomputed"), pad_token_id=tokenizer.pad_token_id)
    print(f"wspo-kernels: precomputed logps for {len(out)} examples -> {config['output_dir']}/precomputed/dataset")
    return out


def train_main(config_path):
    from transformers import TrainingArguments

    from .data import WSPODataCollator
    from .trainer import WSPOTrainer
    config = load_config(config_path)
    dtype, tokenizer, ds = _setup(config)
    frozen = {}
    if config.get("precompute", True):
        ds = _precompute(config, dtype, tokenizer, ds)
    else:
        frozen = {"weak_aligned_model": _load_model(config["weak_aligned"], dtype),
                  "weak_base_model": _load_model(config["weak_base"], dtype)}
        if config.get("ref") or not config.get("lora"):
            frozen["ref_model"] = _load_model(config.get("ref") or config["policy"], dtype)
    policy = _load_model(config["policy"], dtype)
    if config.get("lora"):
        from peft import LoraConfig, get_peft_model
        lora = config["lora"]
        policy = get_peft_model(policy, LoraConfig(r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32),
                                                   lora_dropout=lora.get("dropout", 0.0),
                                                   target_modules=lora.get("target_modules", "all-linear"),
                                                   task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=config["output_dir"], report_to=[],
                             **{k: config[k] for k in TRAIN_KEYS if k in config})
    trainer = WSPOTrainer(policy, args, train_dataset=ds, gamma=config.get("gamma", 0.1), processing_class=tokenizer,
                          data_collator=WSPODataCollator(tokenizer.pad_token_id, max_length=config.get("cutoff_len")),
                          **frozen)
    trainer.train()
    trainer.save_model(os.path.join(config["output_dir"], "final"))
    return trainer
