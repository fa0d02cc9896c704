"""Run the frozen models once over a tokenised dataset and keep their per-token logps as columns.

    ds = precompute_logps(ds, ref_model=strong_base, weak_aligned_model=weak_aligned, weak_base_model=weak_base,
                          output_dir="precomputed/")            # resumable: finished shards are skipped
    WSPOTrainer(policy, args, train_dataset=ds, gamma=0.1)   # no frozen model resident while training

The three components are stored separately (``LOGPS_COLUMNS``), so gamma can change without
recomputing.  Each model's logps come from ``linear_token_logprobs`` on its final hidden states: no
model's full logits are built.  Values are per position of ``labels[1:]`` (the causal shift).

The cache under ``output_dir`` is fingerprinted (``fingerprint.json``): the models' identities (by
default a hash of each model's config, dtypes and a sample of every parameter; the CLI passes a hash of
the checkpoint files instead, so it can check the cache without loading a model), the tokenised
dataset's content (so the tokenizer, the data, ``cutoff_len`` and the truncation rule), the shard size
and the cache format.  A cache made for anything else is reported with the fields that differ and
recomputed; a shard that does not load or has the wrong number of rows is recomputed.  Logps are
stored as float32; the shards (kept for resuming) are removed once the whole dataset is saved.
"""
import hashlib
import json
import os
import shutil

import torch

from .. import linear_token_logprobs
from .data import LOGPS_COLUMNS, WSPODataCollator
from .model_io import lm_head_inputs

CACHE_FORMAT = 2
FINGERPRINT_FILE = "fingerprint.json"
PARAM_SAMPLE = 256  # elements hashed per parameter tensor for a model's identity


def model_fingerprint(model) -> str:
    """A hash of a model's config, parameter names, shapes, dtypes and a strided sample of their values."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update((config.to_json_string(use_diff=False) if config is not None else type(model).__name__).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // PARAM_SAMPLE)][:PARAM_SAMPLE].contiguous().cpu()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """A hash of every row's input_ids and labels."""
    h = hashlib.sha256()
    for batch in dataset.select_columns(["input_ids", "labels"]).iter(batch_size=1024):
        h.update(json.dumps(batch).encode())
    return h.hexdigest()


def cache_fingerprint(dataset, model_ids: dict, shard_size: int) -> dict:
    from .. import __version__
    return {"format": CACHE_FORMAT, "wspo_kernels": __version__, "models": dict(sorted(model_ids.items())),
            "dataset": dataset_fingerprint(dataset), "rows": len(dataset), "shard_size": shard_size}


def _stored_fingerprint(output_dir):
    try:
        with open(os.path.join(output_dir, FINGERPRINT_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cache_matches(output_dir, wanted, log=None) -> bool:
    """Whether the cache in ``output_dir`` was made for ``wanted``; if not, ``log`` says what differs."""
    stored = _stored_fingerprint(output_dir)
    if stored == wanted:
        return True
    if stored is not None and log is not None:
        diff = [k for k in wanted if k != "models" and stored.get(k) != wanted[k]]
        diff += [f"{role} model" for role, fp in wanted["models"].items() if stored.get("models", {}).get(role) != fp]
        log(f"wspo-kernels: the logps cache in {output_dir} was made for a different {', '.join(diff)}: recomputing")
    return False


def load_cached_logps(dataset, output_dir, *, model_ids: dict, shard_size: int = 256):
    """The dataset with its logps columns when ``output_dir`` holds a complete cache made for exactly
    this dataset and these models (no model needs to be loaded), else None."""
    return _complete_cache(output_dir, cache_fingerprint(dataset, model_ids, shard_size))


def _complete_cache(output_dir, wanted):
    from datasets import load_from_disk
    if not _cache_matches(output_dir, wanted):
        return None
    try:
        result = load_from_disk(os.path.join(output_dir, "dataset"))
    except Exception:  # incomplete or broken: precompute_logps checks the shards one by one
        return None
    return result if len(result) == wanted["rows"] else None


def _shard_logps(models, rows, collate, device, backend):
    batch = collate(rows)
    lengths = [len(r["input_ids"]) - 1 for r in rows]
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    out = {}
    with torch.no_grad():
        for role, model in models.items():
            hidden, weight, bias = lm_head_inputs(model, ids, mask)
            logps = linear_token_logprobs(hidden, weight, labels, bias=bias, shift=True, backend=backend).cpu()
            out[LOGPS_COLUMNS[role]] = [lp[:n].tolist() for lp, n in zip(logps, lengths)]
    return out


def _load_shard(path, rows, log):
    from datasets import load_from_disk
    try:
        shard = load_from_disk(path)
    except Exception as e:
        log(f"wspo-kernels: shard {path} does not load ({type(e).__name__}): recomputing it")
        return None
    if len(shard) != rows:
        log(f"wspo-kernels: shard {path} holds {len(shard)} rows, expected {rows}: recomputing it")
        return None
    return shard


def _save_atomically(ds, path):
    """Write then rename: what is on disk under ``path`` is always complete."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def precompute_logps(dataset, *, ref_model=None, weak_aligned_model=None, weak_base_model=None, batch_size=8,
                     shard_size=256, output_dir=None, resume=True, pad_token_id=0, backend=None, device=None,
                     progress=True, model_ids=None, log=print):
    """``dataset`` (input_ids, labels) plus one logps column per given model; saved under ``output_dir``.

    ``model_ids`` ({role: str}, roles as in ``LOGPS_COLUMNS``) names the models in the cache's
    fingerprint; by default ``model_fingerprint`` of each.  Rows without a response token get zero logps.
    """
    from datasets import Dataset, Features, Sequence, Value, concatenate_datasets
    from tqdm.auto import tqdm

    models = {role: m for role, m in zip(LOGPS_COLUMNS, (ref_model, weak_aligned_model, weak_base_model))
              if m is not None}
    if not models:
        raise ValueError("precompute_logps needs at least one of ref_model, weak_aligned_model, weak_base_model")
    device = torch.device(device) if device is not None else next(iter(models.values())).device
    for m in models.values():
        m.eval()
    shard_dir = None
    if output_dir:
        if model_ids is None:
            model_ids = {role: model_fingerprint(m) for role, m in models.items()}
        elif set(model_ids) != set(models):
            raise ValueError(f"model_ids names {sorted(model_ids)}, the models given are {sorted(models)}")
        wanted = cache_fingerprint(dataset, model_ids, shard_size)  # hashes every row: once
        done = _complete_cache(output_dir, wanted) if resume else None
        if done is not None:
            return done
        resume = resume and _cache_matches(output_dir, wanted, log)
        shard_dir = os.path.join(output_dir, "shards")
        if not resume:
            shutil.rmtree(shard_dir, ignore_errors=True)
            shutil.rmtree(os.path.join(output_dir, "dataset"), ignore_errors=True)
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, FINGERPRINT_FILE), "w") as f:  # the shards that follow belong to it
            json.dump(wanted, f, indent=1)
    collate = WSPODataCollator(pad_token_id)
    shards = []
    n_shards = (len(dataset) + shard_size - 1) // shard_size
    bar = tqdm(total=len(dataset), desc="precompute logps", disable=not progress)
    for s in range(n_shards):
        lo, hi = s * shard_size, min(len(dataset), (s + 1) * shard_size)
        path = os.path.join(shard_dir, f"{s:05d}") if shard_dir else None
        shard = _load_shard(path, hi - lo, log) if path and os.path.exists(path) else None
        if shard is None:
            columns = {c: [] for c in (LOGPS_COLUMNS[r] for r in models)}
            for b in range(lo, hi, batch_size):
                rows = [dataset[i] for i in range(b, min(hi, b + batch_size))]
                for c, values in _shard_logps(models, rows, collate, device, backend).items():
                    columns[c].extend(values)
            shard = Dataset.from_dict(columns, features=Features({c: Sequence(Value("float32")) for c in columns}))
            if path:
                _save_atomically(shard, path)
        shards.append(shard)
        bar.update(hi - lo)
    bar.close()
    logps = concatenate_datasets(shards) if shards else Dataset.from_dict({LOGPS_COLUMNS[r]: [] for r in models})
    dataset = dataset.remove_columns([c for c in logps.column_names if c in dataset.column_names])
    result = concatenate_datasets([dataset, logps], axis=1)
    if output_dir:
        _save_atomically(result, os.path.join(output_dir, "dataset"))
        shutil.rmtree(shard_dir, ignore_errors=True)  # the dataset holds them all now
    return result
