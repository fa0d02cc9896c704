"""Run the frozen models once over a tokenised dataset and keep their per-token logps as columns.

    ds = precompute_logps(ds, ref_model=strong_base, weak_aligned_model=weak_aligned, weak_base_model=weak_base,
                          output_dir="precomputed/")            # resumable: finished shards are skipped
    WSPOTrainer(policy, args, train_dataset=ds, gamma=0.1)   # no frozen model resident while training

The three components are stored separately (``LOGPS_COLUMNS``), so gamma can change without
recomputing.  Each model's logps come from ``linear_token_logprobs`` on its final hidden states: no
model's full logits are built.  Values are per position of ``labels[1:]`` (the causal shift).
"""
import os
import shutil

import torch

from .. import linear_token_logprobs
from .data import LOGPS_COLUMNS, WSPODataCollator
from .model_io import lm_head_inputs


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


def precompute_logps(dataset, *, ref_model=None, weak_aligned_model=None, weak_base_model=None, batch_size=8,
                     shard_size=256, output_dir=None, resume=True, pad_token_id=0, backend=None, device=None,
                     progress=True):
    """``dataset`` (input_ids, labels) plus one logps column per given model; saved under ``output_dir``."""
    from datasets import Dataset, concatenate_datasets, load_from_disk
    from tqdm.auto import tqdm

    models = {role: m for role, m in zip(LOGPS_COLUMNS, (ref_model, weak_aligned_model, weak_base_model))
              if m is not None}
    if not models:
        raise ValueError("precompute_logps needs at least one of ref_model, weak_aligned_model, weak_base_model")
    device = torch.device(device) if device is not None else next(iter(models.values())).device
    for m in models.values():
        m.eval()
    collate = WSPODataCollator(pad_token_id)
    shards = []
    shard_dir = os.path.join(output_dir, "shards") if output_dir else None
    n_shards = (len(dataset) + shard_size - 1) // shard_size
    bar = tqdm(total=len(dataset), desc="precompute logps", disable=not progress)
    for s in range(n_shards):
        lo, hi = s * shard_size, min(len(dataset), (s + 1) * shard_size)
        path = os.path.join(shard_dir, f"{s:05d}") if shard_dir else None
        if path and resume and os.path.exists(path):
            shards.append(load_from_disk(path))
            bar.update(hi - lo)
            continue
        columns = {c: [] for c in (LOGPS_COLUMNS[r] for r in models)}
        for b in range(lo, hi, batch_size):
            rows = [dataset[i] for i in range(b, min(hi, b + batch_size))]
            for c, values in _shard_logps(models, rows, collate, device, backend).items():
                columns[c].extend(values)
            bar.update(len(rows))
        shard = Dataset.from_dict(columns)
        if path:  # write then rename: a shard on disk is always complete
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shard.save_to_disk(tmp)
            shutil.rmtree(path, ignore_errors=True)  # a stale shard when resume=False
            os.replace(tmp, path)
        shards.append(shard)
    bar.close()
    logps = concatenate_datasets(shards) if shards else Dataset.from_dict({LOGPS_COLUMNS[r]: [] for r in models})
    dataset = dataset.remove_columns([c for c in logps.column_names if c in dataset.column_names])
    result = concatenate_datasets([dataset, logps], axis=1)
    if output_dir:
        result.save_to_disk(os.path.join(output_dir, "dataset"))
    return result
