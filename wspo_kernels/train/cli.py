"""``wspo-kernels train`` and ``wspo-kernels precompute``: WSPO on real models, from the official recipe's YAML.

    wspo-kernels precompute CONFIG.yaml [key=value ...]   # run the frozen models once (a fingerprinted cache)
    wspo-kernels train CONFIG.yaml [key=value ...]        # reuse or make that cache, train with no frozen model resident

The keys and their defaults: ``wspo-kernels train --help`` (``config.py``).  In order:
1. the config is validated, ``output_dir`` included (it must be writable); nothing is loaded before it passes;
2. the tokenizer and the dataset are read and tokenised once (``cutoff_len`` capped at the models'
   context; rows cut and rows left without a response token are counted, the latter dropped);
3. the seed is set (before any model or adapter is built, as the official parser does);
4. the frozen models' logps come from ``output_dir/precomputed`` when it was made for exactly these
   models, numerics and rows and its checksums hold (checked from the checkpoint files: no model is
   loaded), else they are computed (one run at a time per directory; a model giving NaN / inf is refused);
5. the policy is loaded (under bf16 its trainable parameters are kept in fp32 unless ``pure_bf16``, as
   the official ``init_adapter`` does; LoRA through PEFT), trained, and saved to ``output_dir``.  A rerun
   resumes from the newest complete checkpoint in ``output_dir`` (LLaMA-Factory's rule; incomplete ones are
   skipped and removed) unless ``overwrite_output_dir``; a checkpoint already at the last step trains nothing.

The reference's logps are computed with the policy's own numerics: its weights in the policy's dtype
(fp32 under mixed precision, unless ``pure_bf16`` or LoRA, whose base weights stay in the compute dtype)
and the Trainer's autocast, so that the strong log-ratio is exactly 0 at initialisation.  The weak models
run in the compute dtype under the same autocast.  Errors a user can fix (a full disk, a NaN model or
step, an interrupt) reach ``__main__`` as one-line exceptions (``RUN_ERRORS``, ``Interrupted``).
"""
import contextlib
import hashlib
import math
import os
import shutil

import torch

from . import checkpoints, storage
from .config import ConfigError, format_help, parse_config  # noqa: F401  (re-exported for the CLI)
from .data import IGNORE_INDEX, WSPODataCollator, build_example, encode_prompt_response
from .formats import prompt_response, read_records
from .model_io import PackingUnsupported, context_limit
from .precompute import NonFiniteLogpsError
from .trainer import NonFiniteError, NonFiniteWeightsError

ROLE_KEYS = {"ref": "ref_model", "weak_aligned": "weak_aligned_model", "weak_base": "weak_base_model"}
CHECKPOINT_FILES = (".safetensors", ".bin", ".pt", ".pth")
HASH_CHUNK = 1 << 24
HASH_MEMO = "file_hashes.json"  # in the cache directory: file contents hashed once per (path, size, mtime)


_say = storage.say


class Interrupted(Exception):
    """Ctrl-C (SIGINT): the message says where the run stopped and how to go on."""


RUN_ERRORS = (storage.StorageError, NonFiniteError, NonFiniteLogpsError, NonFiniteWeightsError)  # one line, exit status 1


def _local(name):
    """Local paths made absolute (LoRA adapters record it as their base model); Hub ids unchanged."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def _dtype(training):
    return torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32


def _load_model(name, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(_local(name), dtype=dtype)


def frozen_numerics(w, training):
    """{role: (weights dtype, autocast dtype or None)}: the reference in the policy's own weight dtype
    (``_policy``; under DeepSpeed the engine's: the compute dtype), every frozen model under the autocast
    the Trainer runs the policy in (none under DeepSpeed).  Every model is
    loaded in the compute dtype first (``_load_frozen``), as the policy is: fp32 master weights hold
    the compute dtype's rounding of the checkpoint."""
    dtype = _dtype(training)
    if training.deepspeed:  # the engine holds the policy in the compute dtype and runs it without autocast
        return {role: (dtype, None) for role in ROLE_KEYS}
    autocast = None if dtype == torch.float32 else dtype
    policy_weights = torch.float32 if w.finetuning_type == "full" and not w.pure_bf16 else dtype
    return {role: (policy_weights if role == "ref" else dtype, autocast) for role in ROLE_KEYS}


def _load_frozen(name, training, numerics):
    return _load_model(name, _dtype(training)).to(numerics[0])


def _numerics_id(numerics):
    weights, autocast = numerics
    return f"{weights} weights" + (f", autocast {autocast}" if autocast is not None else "")


@contextlib.contextmanager
def _whole_weights(training):
    """With a ZeRO-3 DeepSpeed config, from_pretrained partitions what it loads (zero.Init), which only a
    DeepSpeed engine can run; the frozen models run outside one (precompute, or resident), so they load
    whole.  The policy loads partitioned, for the engine."""
    if not training.deepspeed:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(training.hf_deepspeed_config)


def _sources(w):
    """Where each frozen model comes from; the reference defaults to the policy's initial weights."""
    return {role: getattr(w, key) or w.model_name_or_path for role, key in ROLE_KEYS.items()}


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
    token dropped; both counted.  A row the formats do not know is a ``ConfigError`` naming the file."""
    try:
        return _prepare_dataset(w, tokenizer, cutoff)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"dataset {w.dataset!r}: {e}") from None


def _prepare_dataset(w, tokenizer, cutoff):
    from datasets import Dataset
    records = read_records(w.dataset)
    if w.max_samples is not None:
        records = records[: w.max_samples] if isinstance(records, list) else records.select(range(min(len(records), w.max_samples)))
    rows, cut, dropped = [], 0, 0
    how = w.truncation
    if isinstance(records, Dataset) and {"input_ids", "labels"} <= set(records.column_names):  # pre-tokenised
        how = "pre-tokenised rows: from the right"
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
            prompt, response, rejected = prompt_response(record, i)
            prompt_ids, response_ids = encode_prompt_response(tokenizer, prompt, response, chat_template=chat)
            paired = len(encode_prompt_response(tokenizer, prompt, rejected, chat_template=chat)[1]) if rejected else 0
            cut += len(prompt_ids) + max(len(response_ids), paired) > cutoff
            row = build_example(prompt_ids, response_ids, max_length=cutoff, truncation=w.truncation, paired_len=paired)
            if row is None:
                dropped += 1
            else:
                rows.append(row)
    _say(f"{len(rows)} examples from {w.dataset}; {cut} cut to {cutoff} tokens ({how}); {dropped} dropped "
         "(no response token within the cutoff)")
    if not rows:
        raise ValueError(f"no example keeps a response token within {cutoff} tokens")
    n_eval = int(w.val_size) if w.val_size >= 1 else math.ceil(w.val_size * len(rows))  # as train_test_split
    if n_eval >= len(rows):
        raise ValueError(f"val_size {w.val_size} leaves no training example of {len(rows)}")
    return Dataset.from_list(rows)


def _snapshot_dir(name):
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not in the Hub cache (yet)
        return None


def _file_digest(path, memo):
    st = os.stat(path)
    key = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    if key not in memo:
        h = hashlib.blake2b(digest_size=32)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
                h.update(chunk)
        memo[key] = h.hexdigest()
    return memo[key]


def checkpoint_fingerprint(name, dtype, memo):
    """A model's identity: the dtype it runs in and a hash of every byte of its config and weight files
    (memoised in ``memo`` by path, size and modification time); None when the files are not here."""
    path = _snapshot_dir(name)
    if path is None:
        return None
    h = hashlib.sha256(str(dtype).encode())
    for file in sorted(os.listdir(path)):
        if file == "config.json" or file.endswith(CHECKPOINT_FILES):
            h.update(f"{file}:{_file_digest(os.path.join(path, file), memo)}".encode())
    return h.hexdigest()


def _model_ids(sources, numerics, cache):
    memo_path = os.path.join(cache, HASH_MEMO)
    memo = storage.read_json(memo_path)
    memo = memo if isinstance(memo, dict) else {}
    ids = {role: checkpoint_fingerprint(_local(name), _numerics_id(numerics[role]), memo)
           for role, name in sources.items()}
    with storage.writing(cache, "the logps cache"):
        os.makedirs(cache, exist_ok=True)
    storage.write_json_atomically(memo_path, memo)
    return ids


def precomputed_dataset(config, tokenizer, ds):
    """``ds`` with the frozen models' logps columns: from the cache when it matches, else computed (by the
    main process of a multi-process launch; the others then find the cache complete)."""
    cache = config.wspo.precompute_dir or os.path.join(config.training.output_dir, "precomputed")
    try:
        with config.training.main_process_first(desc="precompute logps"):
            return _precomputed_dataset(config, tokenizer, ds, cache)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted during precompute; the finished shards in {cache} are kept and checked: "
                          "rerun the same command to go on") from None


def _precomputed_dataset(config, tokenizer, ds, cache):
    from .precompute import CacheChanged, cached_roles, check_batch_tokens, load_cached_logps, precompute_logps
    w = config.wspo
    try:  # the rows as cut (cutoff_len capped at the context): each must fit a batch, checked before any model loads
        check_batch_tokens(ds, w.precompute_batch_tokens, key="precompute_batch_tokens")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    numerics = frozen_numerics(w, config.training)
    sources = _sources(w)
    ids = _model_ids(sources, numerics, cache)
    if all(ids.values()):
        cached = load_cached_logps(ds, cache, model_ids=ids, log=_say)
        if cached is not None:
            _say(f"reusing the precomputed logps in {cache} (same models, numerics and rows; checksums verified)")
            return cached
    if config.training.local_process_index != 0:  # the node's main process computed it, or failed
        raise storage.StorageError(f"the main process left no complete logps cache in {cache} (its error says why)")
    device = "cpu" if config.training.use_cpu or not torch.cuda.is_available() else "cuda"
    # A sweep that changed one model (another weak-aligned checkpoint) loads and runs only that one.
    held = cached_roles(ds, cache, model_ids=ids, log=_say) if all(ids.values()) else set()
    autocast = {a for _, a in numerics.values()}.pop()  # one autocast for every frozen model
    models = {}
    for attempt in range(2):  # a second try with every model: another run replaced the cache meanwhile
        with _whole_weights(config.training):
            models.update({role: _load_frozen(name, config.training, numerics[role]).to(device)
                           for role, name in sources.items() if role not in held and role not in models})
        if not all(ids.values()):  # downloaded just now
            ids = _model_ids(sources, numerics, cache)
        try:
            out = precompute_logps(ds, ref_model=models.get("ref"), weak_aligned_model=models.get("weak_aligned"),
                                   weak_base_model=models.get("weak_base"), batch_size=w.precompute_batch_size,
                                   batch_tokens=w.precompute_batch_tokens,
                                   output_dir=cache, pad_token_id=tokenizer.pad_token_id,
                                   model_ids=ids if all(ids.values()) else None, model_names=sources,
                                   autocast_dtype=autocast, backend=w.backend, log=_say)
            break
        except CacheChanged:
            if attempt:
                raise
            held = set()
    _say(f"precomputed logps for {len(out)} examples -> {cache}")
    return out


def _setup(argv, prog):
    from transformers import AutoTokenizer
    config = parse_config([argv] if isinstance(argv, str) else argv, prog=prog)
    cutoff = effective_cutoff(config.wspo)
    tokenizer = AutoTokenizer.from_pretrained(_local(config.wspo.model_name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return config, tokenizer, cutoff, prepare_dataset(config.wspo, tokenizer, cutoff)


def precompute_main(argv):
    config, tokenizer, _, ds = _setup(argv, "wspo-kernels precompute")
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


def resume_point(config):
    """The checkpoint to resume from, or None: an explicit path (checked complete by ``parse_config``);
    else, unless ``overwrite_output_dir``, the newest complete checkpoint in ``output_dir``."""
    args = config.training
    wanted = args.resume_from_checkpoint
    if isinstance(wanted, str):
        return wanted
    if wanted is False or (wanted is None and config.overwrite_output_dir):
        return None
    found = checkpoints.latest_complete(args.output_dir, log=_say) if args.process_index == 0 else None
    if args.world_size > 1:  # rank 0 decides: on node-local storage the other ranks may not see the checkpoints
        import torch.distributed as dist
        args.device  # noqa: B018  (sets up the process group)
        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    if found is not None:
        _say(f"resuming from {found} (step {checkpoints.global_step(found)})"
             + ("" if wanted else "; overwrite_output_dir=true starts over instead"))
    elif wanted is True:
        _say(f"resume_from_checkpoint: no complete checkpoint in {args.output_dir} yet: starting from step 0")
    return found


RUN_RECORD = "wspo_run.json"  # in output_dir: what `wspo-kernels eval` needs to know of a finished run


def _save_final(trainer, result, w):
    """The model (or adapters) into a temporary directory, then each file renamed into ``output_dir``: a kill
    or a full disk leaves the files of the last complete save, not a torn one (a rerun resumes from the
    last checkpoint and saves again)."""
    out = trainer.args.output_dir
    tmp = os.path.join(out, ".final-model.tmp")
    try:
        with storage.writing(out, "the final model"):
            if trainer.args.should_save:
                shutil.rmtree(tmp, ignore_errors=True)
            trainer.accelerator.wait_for_everyone()  # every rank writes its part after the removal (DeepSpeed)
            trainer.save_model(tmp)
            trainer.accelerator.wait_for_everyone()  # ... and before the files move
            if trainer.args.should_save:
                for name in os.listdir(tmp):
                    target = os.path.join(out, name)
                    if os.path.isdir(target) and not os.path.islink(target):  # e.g. a DeepSpeed global_step dir
                        shutil.rmtree(target)
                    os.replace(os.path.join(tmp, name), target)
            trainer.log_metrics("train", result.metrics)
            trainer.save_metrics("train", result.metrics)
            trainer.save_state()
        if trainer.args.should_save:
            args = trainer.args
            storage.write_json_atomically(os.path.join(out, RUN_RECORD), {
                "pref_beta": w.pref_beta, "finetuning_type": w.finetuning_type,
                "model_name_or_path": _local(w.model_name_or_path), **{k: _local(v) if v else None for k, v in (
                    (key, getattr(w, key)) for key in ROLE_KEYS.values())}, "bf16": args.bf16, "fp16": args.fp16,
                "cutoff_len": w.cutoff_len, "truncation": w.truncation, "template": w.template,
                "global_step": trainer.state.global_step})
    finally:
        if trainer.args.should_save:
            shutil.rmtree(tmp, ignore_errors=True)


def _trainer(policy, args, ds, eval_ds, tokenizer, cutoff, w, frozen):
    from .trainer import WSPOTrainer
    collator = WSPODataCollator(tokenizer.pad_token_id, max_length=cutoff, pad_to_multiple_of=8,
                                padding_free=w.padding_free)
    return WSPOTrainer(policy, args, train_dataset=ds, eval_dataset=eval_ds, gamma=w.pref_beta,
                       processing_class=tokenizer, backend=w.backend, disable_dropout=w.disable_dropout,
                       data_collator=collator, stop_on_nonfinite=w.stop_on_nonfinite, padding_free=w.padding_free,
                       **frozen)


def train_main(argv):
    from transformers import set_seed

    config, tokenizer, cutoff, ds = _setup(argv, "wspo-kernels train")
    w, args = config.wspo, config.training
    numerics = frozen_numerics(w, args)
    resume = resume_point(config)
    frozen = {}
    if w.precompute:
        ds = precomputed_dataset(config, tokenizer, ds)
    else:
        sources = _sources(w)
        if w.finetuning_type == "lora" and not w.ref_model:
            del sources["ref"]  # the reference is the policy with its adapters disabled
        with _whole_weights(args):
            frozen = {f"{role}_model": _load_frozen(name, args, numerics[role]) for role, name in sources.items()}
    eval_ds = None
    if w.val_size > 0:
        split = ds.train_test_split(test_size=int(w.val_size) if w.val_size >= 1 else w.val_size, seed=args.seed)
        ds, eval_ds = split["train"], split["test"]
    set_seed(args.seed)  # before the policy and its adapters are built: reproducible LoRA initialisation
    policy = _policy(w, _dtype(args))
    try:
        trainer = _trainer(policy, args, ds, eval_ds, tokenizer, cutoff, w, frozen)
    except PackingUnsupported as e:  # a model that cannot keep packed sequences apart: the config's to change
        raise ConfigError(str(e)) from None
    try:
        result = trainer.train(resume_from_checkpoint=resume, overwrite_checkpoints=config.overwrite_output_dir)
        _save_final(trainer, result, w)
    except KeyboardInterrupt:
        last = checkpoints.latest_complete(args.output_dir)
        how = ("rerun with resume_from_checkpoint=true to resume from it" if config.overwrite_output_dir
               else "rerun the same command to resume from it")
        raise Interrupted(f"interrupted at step {trainer.state.global_step}; "
                          + (f"last complete checkpoint {last}: {how}" if last else
                             "no checkpoint was saved yet: a rerun starts over")) from None
    if args.do_eval and eval_ds is not None:  # as the official workflow: a final evaluation
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if w.plot_loss:
        _plot_loss(trainer, os.path.join(args.output_dir, "training_loss.png"))
    what = "LoRA adapters" if w.finetuning_type == "lora" else "model"
    _say(f"{what} saved to {os.path.abspath(args.output_dir)}")
    return trainer
