"""Run the frozen models once over a tokenised dataset and keep their per-token logps as columns.

    ds = precompute_logps(ds, ref_model=strong_base, weak_aligned_model=weak_aligned, weak_base_model=weak_base,
                          output_dir="precomputed/")            # resumable: finished shards are skipped
    WSPOTrainer(policy, args, train_dataset=ds, gamma=0.1)   # no frozen model resident while training

The three components are stored separately (``LOGPS_COLUMNS``), so gamma can change without
recomputing.  Each model's logps come from ``linear_token_logprobs`` on its final hidden states: no
model's full logits are built.  Values are per position of ``labels[1:]`` (the causal shift).  A model
that gives a non-finite logp for a counted token (NaN / inf weights, an overflow) is refused with its
role, its name and the count: nothing non-finite is stored.  ``autocast_dtype`` runs the models under
``torch.autocast`` as the trainer runs the policy (mixed precision), so that the reference's logps are
the policy's own numbers at initialisation.

The cache under ``output_dir`` is written so that a job may die at any instant, and is never trusted on
its name alone:
- ``fingerprint.json`` names what the cache is for: the models' identities (by default a hash of each
  model's config, dtypes and a sample of every parameter; the CLI passes a hash of the checkpoint files
  and the numerics instead, so it can check the cache without loading a model), the tokenised rows (a
  checksum of ``input_ids`` and ``labels``: the tokenizer, the data, ``cutoff_len``, the truncation rule),
  the shard size and the cache format.
- every shard (``shards/NNNNN``) and the final ``dataset`` are written to a temporary directory with a
  ``checksums.json`` (the fingerprint and a checksum of every column) and renamed into place; a shard or
  a dataset is used only when its checksums match what it holds (a flipped bit, a truncated or zeroed
  file is recomputed, and the log says which column differs).  The dataset's record carries the whole
  fingerprint: it is committed with the data in one rename.
- one writer at a time (``storage.directory_lock``): a second run on the same directory waits, and the
  fingerprint is re-read before the final rename.
Logps are stored as float32; the shards (kept for resuming) are removed once the whole dataset is saved.
"""
import contextlib
import hashlib
import json
import os
import shutil

import numpy as np
import torch

from .. import linear_token_logprobs
from . import storage
from .data import IGNORE_INDEX, LOGPS_COLUMNS, WSPODataCollator
from .model_io import lm_head_inputs

CACHE_FORMAT = 3
FINGERPRINT_FILE = "fingerprint.json"
CHECKSUM_FILE = "checksums.json"  # in every shard and in the dataset: the fingerprint and each column's checksum
TOKEN_COLUMNS = ("input_ids", "labels")
PARAM_SAMPLE = 256  # elements hashed per parameter tensor for a model's identity


class NonFiniteLogpsError(ValueError):
    """A frozen model gives NaN or inf logps for counted tokens."""


class CacheChanged(ValueError):
    """A role left to the cache (``cached_roles``) is no longer in it: another run replaced the cache."""


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


def column_checksums(dataset, columns) -> dict:
    """{column: checksum}, whatever the arrow chunking, so a dataset and its copy on disk agree.  Lists of
    numbers (tokens, logps; integers as int64) hash their row lengths and values; any other column (an id,
    a prompt kept beside the tokens) hashes its values as JSON."""
    import pyarrow as pa
    table = dataset.with_format("arrow")[:]
    out = {}
    for name in columns:
        kind = table.schema.field(name).type
        lengths, values = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
        for chunk in table.column(name).chunks:
            if pa.types.is_list(kind) and (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)):
                lengths.update(np.ascontiguousarray(chunk.value_lengths().fill_null(-1).to_numpy(), np.int64).tobytes())
                flat = chunk.flatten().to_numpy(zero_copy_only=False)
                values.update(np.ascontiguousarray(flat, np.int64 if flat.dtype.kind in "iu" else None).tobytes())
            elif len(chunk):
                values.update(json.dumps(chunk.to_pylist(), default=str).encode()[1:-1] + b",")
        out[name] = f"{kind}:{lengths.hexdigest()}:{values.hexdigest()}"
    return out


def dataset_fingerprint(dataset=None, *, checksums=None) -> str:
    """A checksum of every row's input_ids and labels (from their ``column_checksums`` when given)."""
    checksums = checksums or column_checksums(dataset, TOKEN_COLUMNS)
    return hashlib.sha256(json.dumps({c: checksums[c] for c in TOKEN_COLUMNS}).encode()).hexdigest()


def cache_fingerprint(dataset, model_ids: dict, shard_size: int) -> dict:
    from .. import __version__
    return {"format": CACHE_FORMAT, "wspo_kernels": __version__, "models": dict(sorted(model_ids.items())),
            "dataset": dataset_fingerprint(dataset), "rows": len(dataset), "shard_size": shard_size}


def _differences(stored, wanted):
    diff = [k for k in wanted if k != "models" and stored.get(k) != wanted[k]]
    return diff + [f"{role} model" for role, fp in wanted["models"].items() if stored.get("models", {}).get(role) != fp]


def _cache_matches(output_dir, wanted, log=None) -> bool:
    """Whether the shards in ``output_dir`` were made for ``wanted``; if not, ``log`` says what differs."""
    stored = storage.read_json(os.path.join(output_dir, FINGERPRINT_FILE))
    if stored == wanted:
        return True
    if stored is not None and log is not None:
        log(f"the logps cache in {output_dir} was made for a different {', '.join(_differences(stored, wanted))}: "
            "recomputing")
    return False


def load_cached_logps(dataset, output_dir, *, model_ids: dict, shard_size: int = 256, log=storage.say):
    """``dataset`` with its logps columns when ``output_dir`` holds a complete cache made for exactly this
    dataset and these models, whose checksums hold (no model needs to be loaded), else None."""
    with storage.directory_lock(output_dir, shared=True, log=log, what=f"the logps cache {output_dir}"):
        return _complete_cache(dataset, output_dir, cache_fingerprint(dataset, model_ids, shard_size), log)


def _verified(path, fingerprint, rows, log, what):
    """(dataset saved at ``path``, its column checksums) when its checksum record names ``fingerprint``
    and every column's checksum matches what it holds; else None, and ``log`` says why."""
    from datasets import load_from_disk
    if not os.path.exists(path):
        return None
    record = storage.read_json(os.path.join(path, CHECKSUM_FILE))
    if not isinstance(record, dict) or not isinstance(record.get("columns"), dict):
        log(f"{what} in {path} has no whole {CHECKSUM_FILE} (interrupted, damaged, or written by an older "
            "version): recomputing")
        return None
    if record.get("fingerprint") != fingerprint:  # made for other models or rows (the fingerprint says which)
        return None
    try:
        ds = load_from_disk(path)
    except Exception as e:
        log(f"{what} in {path} does not load ({type(e).__name__}): recomputing")
        return None
    if len(ds) != rows:
        log(f"{what} in {path} holds {len(ds)} rows, expected {rows}: recomputing")
        return None
    try:
        held = column_checksums(ds, record["columns"])
    except Exception as e:  # a column missing, or data arrow cannot read
        log(f"{what} in {path} is unreadable ({type(e).__name__}: {e}): recomputing")
        return None
    differ = [c for c, digest in record["columns"].items() if held[c] != digest]
    if differ:
        log(f"{what} in {path} does not match its checksums ({', '.join(differ)} differ: the files were "
            "changed or damaged): recomputing")
        return None
    return ds, held


def _save_verified(ds, path, fingerprint, what):
    """Write ``ds`` and its checksum record to a temporary directory, then rename it into place."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with storage.writing(os.path.dirname(path), what):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            ds.save_to_disk(tmp)
        storage.write_json_atomically(os.path.join(tmp, CHECKSUM_FILE),
                                      {"fingerprint": fingerprint, "columns": column_checksums(ds, ds.column_names)})
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _with_logps(dataset, logps):
    """The freshly tokenised rows (the ones fingerprinted) with the cached logps columns beside them."""
    from datasets import concatenate_datasets
    columns = [c for c in LOGPS_COLUMNS.values() if c in logps.column_names]
    dataset = dataset.remove_columns([c for c in columns if c in dataset.column_names])
    return concatenate_datasets([dataset, logps.select_columns(columns)], axis=1)


def _complete_cache(dataset, output_dir, wanted, log):
    found = _verified(os.path.join(output_dir, "dataset"), wanted, wanted["rows"], log, "the logps cache")
    if found is None:
        return None
    cached, held = found
    if not set(TOKEN_COLUMNS) <= set(held) or dataset_fingerprint(checksums=held) != wanted["dataset"]:  # a record that lies about its rows
        log(f"the logps cache in {output_dir} holds other rows than its fingerprint names: recomputing")
        return None
    return _with_logps(dataset, cached)


def columns_of(roles):
    return [LOGPS_COLUMNS[r] for r in roles]


def _counted(labels):
    """Positions of ``labels[:, 1:]`` that carry a response token (the causal shift)."""
    return labels[:, 1:] != IGNORE_INDEX


def _shard_logps(models, rows, collate, device, backend, autocast_dtype=None, names=None, row_numbers=None):
    batch = collate(rows)
    lengths = [len(r["input_ids"]) - 1 for r in rows]
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    counted = _counted(labels)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    out = {}
    with torch.inference_mode(), amp:
        for role, model in models.items():
            hidden, weight, bias = lm_head_inputs(model, ids, mask)
            logps = linear_token_logprobs(hidden, weight, labels, bias=bias, shift=True, backend=backend)
            bad = int((~torch.isfinite(logps) & counted).sum())  # one sync per batch: the values go to the host next
            if bad:
                name = f" ({names[role]})" if names and names.get(role) else ""
                raise NonFiniteLogpsError(
                    f"{role}{name} gives non-finite logps for {bad} of {int(counted.sum())} tokens in rows "
                    f"{_row_list(row_numbers or range(len(rows)))}: its weights hold NaN / inf, or it overflows in this "
                    "dtype; nothing was stored")
            out[LOGPS_COLUMNS[role]] = [lp[:n].tolist() for lp, n in zip(logps.float().cpu(), lengths)]
    return out


def length_batches(lengths, batch_tokens, max_rows=None):
    """Row indices (into ``lengths``) in batches of similar lengths: longest first, each batch as many rows
    as fit ``batch_tokens`` padded tokens (rows x its longest row), at most ``max_rows``.  Sorting is what
    removes the padding: a batch pads only to its own longest row, which the next-longest rows nearly reach."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * longest > batch_tokens or (max_rows and len(current) >= max_rows)):
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


def check_batch_tokens(dataset, batch_tokens, key="batch_tokens"):
    """Every row must fit a batch on its own: else a clear error naming the key, before any model runs."""
    if batch_tokens is None:
        return
    if not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"{key} must be a positive number of tokens, got {batch_tokens!r}")
    longest = max((len(ids) for ids in dataset["input_ids"]), default=0)
    if longest > batch_tokens:
        raise ValueError(f"{key}={batch_tokens} is smaller than the longest row ({longest} tokens): a row must fit a "
                         f"batch on its own; raise {key} to at least {longest} (or cut the rows: cutoff_len)")


def _row_list(numbers):
    numbers = sorted(numbers)
    return ", ".join(map(str, numbers[:8])) + (f" and {len(numbers) - 8} more" if len(numbers) > 8 else "")


def precompute_logps(dataset, *, ref_model=None, weak_aligned_model=None, weak_base_model=None, batch_size=8,
                     shard_size=256, output_dir=None, resume=True, pad_token_id=0, backend=None, device=None,
                     progress=True, model_ids=None, model_names=None, autocast_dtype=None, log=storage.say,
                     batch_tokens=None):
    """``dataset`` (input_ids, labels) plus one logps column per model; saved under ``output_dir``.

    Each shard's rows run longest first in batches of similar lengths (``length_batches``), up to
    ``batch_tokens`` padded tokens and ``batch_size`` rows per batch (``batch_tokens=None``: ``batch_size``
    rows in the dataset's order, as before), under ``torch.inference_mode()``; the logps are written back
    in the dataset's order.

    ``model_ids`` ({role: str}, roles as in ``LOGPS_COLUMNS``) names the models in the cache's
    fingerprint; by default ``model_fingerprint`` of each (and ``autocast_dtype``).  A role whose model
    is unchanged since the cache in ``output_dir`` was made (same id, same rows) is taken from it, and
    only the others are run: ``model_ids`` may name a role whose model is not given when the cache holds
    it (``cached_roles``; a sweep over weak-aligned checkpoints reruns only that model).
    ``model_names`` ({role: str}) names the models in messages.  Rows without a response token get
    zero logps.
    """
    models = {role: m for role, m in zip(LOGPS_COLUMNS, (ref_model, weak_aligned_model, weak_base_model))
              if m is not None}
    if not models and not model_ids:
        raise ValueError("precompute_logps needs at least one of ref_model, weak_aligned_model, weak_base_model")
    check_batch_tokens(dataset, batch_tokens)
    for m in models.values():
        m.eval()
    device = torch.device(device) if device is not None else next(iter(models.values())).device if models else None
    run = dict(dataset=dataset, batch_size=batch_size, batch_tokens=batch_tokens, shard_size=shard_size,
               pad_token_id=pad_token_id,
               backend=backend, device=device, progress=progress, names=model_names, autocast_dtype=autocast_dtype,
               log=log)
    if not output_dir:
        return _precompute(models=models, **run, output_dir=None, wanted=None, reused=None)
    if model_ids is None:
        model_ids = {role: model_fingerprint(m) + (f":autocast {autocast_dtype}" if autocast_dtype else "")
                     for role, m in models.items()}
    elif not set(models) <= set(model_ids):
        raise ValueError(f"model_ids names {sorted(model_ids)}, the models given are {sorted(models)}")
    wanted = cache_fingerprint(dataset, model_ids, shard_size)  # hashes every row: once
    with storage.directory_lock(output_dir, log=log, what=f"the logps cache {output_dir}"):
        done = _complete_cache(dataset, output_dir, wanted, log) if resume else None
        if done is not None:
            return done
        reused = _reusable(output_dir, wanted, log) if resume else None
        missing = [r for r in model_ids if r not in models and (reused is None or LOGPS_COLUMNS[r] not in
                                                                  reused.column_names)]
        if missing:
            raise CacheChanged(f"no model given for {', '.join(missing)} and the cache in {output_dir} does not hold "
                               "its logps for these rows (another run changed it)")
        if not (resume and _cache_matches(output_dir, wanted, log)):
            shutil.rmtree(os.path.join(output_dir, "shards"), ignore_errors=True)
            if reused is None:  # else it stays until the new cache replaces it (a kill keeps it reusable)
                shutil.rmtree(os.path.join(output_dir, "dataset"), ignore_errors=True)
            # the shards that follow belong to it
            storage.write_json_atomically(os.path.join(output_dir, FINGERPRINT_FILE), wanted)
        to_run = {r: m for r, m in models.items() if reused is None or LOGPS_COLUMNS[r] not in reused.column_names}
        return _precompute(models=to_run, **run, output_dir=output_dir, wanted=wanted, reused=reused)


def _reusable(output_dir, wanted, log):
    """The logps columns of the complete cache in ``output_dir`` whose models are ``wanted``'s, when it
    was made for the same rows (its checksums verified); None when there is none."""
    path = os.path.join(output_dir, "dataset")
    record = storage.read_json(os.path.join(path, CHECKSUM_FILE))
    old = record.get("fingerprint") if isinstance(record, dict) else None
    # Another version of this package may compute other logps: only its own are reused.
    if not isinstance(old, dict) or any(old.get(k) != wanted[k] for k in ("format", "wspo_kernels", "dataset", "rows")):
        return None
    same = [r for r, fp in wanted["models"].items() if old.get("models", {}).get(r) == fp]
    found = _verified(path, old, wanted["rows"], log, "the logps cache") if same else None
    if found is None or dataset_fingerprint(checksums=found[1]) != wanted["dataset"]:
        return None
    log(f"reusing the {', '.join(same)} logps of the cache in {output_dir} (same models and rows)")
    return found[0].select_columns([LOGPS_COLUMNS[r] for r in same])


def cached_roles(dataset, output_dir, *, model_ids, shard_size=256, log=storage.say):
    """The roles whose logps the cache in ``output_dir`` already holds for these rows and models: their
    models need not be loaded (``precompute_logps`` takes them from the cache)."""
    wanted = cache_fingerprint(dataset, model_ids, shard_size)
    with storage.directory_lock(output_dir, shared=True, log=log, what=f"the logps cache {output_dir}"):
        if _complete_cache(dataset, output_dir, wanted, lambda *_: None) is not None:
            return set(model_ids)
        reused = _reusable(output_dir, wanted, lambda *_: None)
    return {r for r in model_ids if reused is not None and LOGPS_COLUMNS[r] in reused.column_names}


def _precompute(*, models, dataset, batch_size, batch_tokens, shard_size, pad_token_id, backend, device, progress,
                names, autocast_dtype, log, output_dir, wanted, reused):
    from datasets import Dataset, Features, Sequence, Value, concatenate_datasets
    from tqdm.auto import tqdm

    shard_dir = os.path.join(output_dir, "shards") if output_dir else None
    collate = WSPODataCollator(pad_token_id)
    shards = []
    n_shards = (len(dataset) + shard_size - 1) // shard_size if models else 0  # none: every column reused
    bar = tqdm(total=len(dataset), desc="precompute logps", disable=not progress)
    try:  # the bar ends its line whatever stops the loop, so an error message starts on its own
        for s in range(n_shards):
            lo, hi = s * shard_size, min(len(dataset), (s + 1) * shard_size)
            path = os.path.join(shard_dir, f"{s:05d}") if shard_dir else None
            found = _verified(path, wanted, hi - lo, log, f"shard {s}") if path else None
            shard = (found[0].select_columns(columns_of(models))
                     if found and set(columns_of(models)) <= set(found[0].column_names) else None)
            if shard is None:
                rows = dataset.select(range(lo, hi))
                if batch_tokens is None:
                    batches = [list(range(b, min(hi - lo, b + batch_size))) for b in range(0, hi - lo, batch_size)]
                else:
                    batches = length_batches([len(ids) for ids in rows["input_ids"]], batch_tokens, batch_size)
                columns = {c: [None] * (hi - lo) for c in columns_of(models)}
                for batch in batches:
                    values = _shard_logps(models, [rows[i] for i in batch], collate, device, backend, autocast_dtype,
                                          names, [lo + i for i in batch])
                    for c, per_row in values.items():
                        for i, v in zip(batch, per_row):
                            columns[c][i] = v  # back in the dataset's order
                shard = Dataset.from_dict(columns, features=Features({c: Sequence(Value("float32")) for c in columns}))
                if path:
                    _save_verified(shard, path, wanted, f"shard {s} of the logps cache")
            shards.append(shard)
            bar.update(hi - lo)
    finally:
        bar.close()
    logps = concatenate_datasets(shards) if shards else Dataset.from_dict({c: [] for c in columns_of(models)})
    if reused is not None:
        logps = concatenate_datasets([logps.select_columns(columns_of(models)), reused], axis=1) if models else reused
    result = _with_logps(dataset, logps)
    if output_dir:
        # Commit: the record inside the dataset carries the fingerprint, so data and fingerprint land in one
        # rename.  A run that changed the fingerprint meanwhile (no working lock on this filesystem) wins.
        if storage.read_json(os.path.join(output_dir, FINGERPRINT_FILE)) != wanted:
            raise storage.StorageError(f"another run changed the logps cache in {output_dir} while this one computed "
                                       "it; nothing of this run was committed: run it again, alone")
        _save_verified(result, os.path.join(output_dir, "dataset"), wanted, "the logps cache")
        shutil.rmtree(shard_dir, ignore_errors=True)  # the dataset holds them all now
    return result
