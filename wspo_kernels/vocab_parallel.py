"""Vocab-parallel label log-probs: each rank of ``vocab_group`` holds a contiguous shard of the vocabulary.

Rank r holds ids ``[offset_r, offset_r + V_r)`` (shards in rank order; sizes may differ) of a model's
logits ``[..., V_r]`` or of its lm_head ``weight [V_r, H]`` / ``bias [V_r]``; labels are global ids and
the same on every rank.  Per row, each rank runs the backend's own statistics kernel on its shard, then
two all-reduces of a few floats per row (never a vocabulary-sized tensor) combine them:

    M   = max_r m_r
    R   = sum_r R_r exp(m_r - M),  R_r = the shard's sum of exp(z - m_r) over every column but the label's
          (``r`` of the backend's statistics on the owner of the label; ``s``, the whole sum, elsewhere)
    z_y = the owner's label logit (a sum in which every other rank adds 0)
    S   = R + exp(z_y - M);   logp = log1p(-R / S) if R / S < 1/2 else (z_y - M) - log S

which keeps the single-process kernels' accuracy (the label's term stays out of R, so 1 - p_y = R/S).
The gradient sweep is the backend's own backward on the shard with the global (M, S, R'): every
column gets -c exp(z_j - M) / S and the label column c R'/S.  The owner passes R' = R (so c (1 - p_y)).
A rank that does not own the label names column 0 of its shard as the label with R' = -exp(z_0 - M),
so that entry is -c p_0, exactly the softmax gradient: no kernel knows about the sharding.

For the linear form the gradient of the (replicated) hidden states is the sum over shards; it is
all-reduced here unless the caller's framework reduces it itself (``reduce_hidden_grad=False``, as in
Megatron's column-parallel region).  Before any data-dependent collective, one all-gather of a few
integers per rank (shard size, dtype, row count, a label checksum) gives every rank the same view,
so a bad input (labels outside the global vocabulary, labels or dtypes that differ between ranks,
an empty shard) raises the same error on every rank instead of hanging some of them; the public
functions run their local checks inside ``agreed(group)``, so a shape error on one rank fails all.
"""
import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import ops
from ._inputs import acc_dtype, check_labels_range

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class _Agreed:
    def __init__(self, group):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("vocab_group needs torch.distributed to be initialised (init_process_group)")
        self.group = group

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        nccl = dist.get_backend(self.group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        flag = torch.tensor([error is not None], dtype=torch.int32, device=device)
        flags = [torch.empty_like(flag) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(flags, flag, group=self.group)
        bad = [i for i, f in enumerate(flags) if f.item()]
        if error is None and bad:
            raise ValueError(f"rank(s) {bad} of vocab_group rejected their inputs (their error says why)")
        return False  # this rank's own error propagates


def agreed(group):
    """Local input checks (shapes, dtypes, options) that every rank of ``group`` passes or fails together:
    an error on one rank is announced by one all-gather of a flag before any collective that depends
    on the data, and every rank raises, so none is left waiting.  A no-op without a group."""
    return contextlib.nullcontext() if group is None else _Agreed(group)


class Shard(NamedTuple):
    offset: int     # first global id this rank holds
    vocab: int      # global vocabulary size (sum of the shard sizes)


def _checksum(labels):
    pos = torch.arange(1, labels.numel() + 1, device=labels.device, dtype=torch.int64)
    return (labels.reshape(-1).to(torch.int64) * pos).sum()


def shard_of(group, v_local: int, dtype: torch.dtype, labels: torch.Tensor, ignore_index: int, name: str) -> Shard:
    """This rank's place in the global vocabulary, checked identically on every rank (one small all-gather)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.stack([torch.tensor(v_local, device=labels.device), torch.tensor(_DTYPES.index(dtype), device=labels.device),
                        torch.tensor(labels.numel(), device=labels.device), _checksum(labels)]).to(torch.int64)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    sizes, dtypes, counts, sums = zip(*(t.tolist() for t in every))
    if len(set(dtypes)) > 1:
        raise ValueError(f"{name}: vocab_group shards have different dtypes across ranks: "
                         + ", ".join(f"rank {i} {_DTYPES[d]}" for i, d in enumerate(dtypes)))
    if len(set(counts)) > 1 or len(set(sums)) > 1:
        raise ValueError(f"{name}: labels differ between the ranks of vocab_group (they must be the same global "
                         f"ids on every rank); label counts per rank: {list(counts)}")
    if min(sizes) < 1:
        raise ValueError(f"{name}: every rank of vocab_group needs at least one vocabulary column; shard sizes "
                         f"{list(sizes)}")
    vocab = sum(sizes)
    check_labels_range(labels, ignore_index, **{f"{name} (sharded over vocab_group, shards {list(sizes)})": vocab})
    return Shard(offset=sum(sizes[:rank]), vocab=vocab)


KERNEL_IGNORE = -1     # the kernels' ignore marker: never a local id (the caller's ignore_index may be one)
Z_LABEL_ROWS = 1 << 22  # hidden elements per block when the linear form gathers its label logits


def _local_labels(labels, ignore_index, offset, v_local):
    """(labels within the shard for the kernels, owned, valid): a row whose label lives elsewhere names
    column 0; an ignored row is KERNEL_IGNORE."""
    local = labels - offset
    valid = labels != ignore_index
    owned = valid & (local >= 0) & (local < v_local)
    lab = torch.where(owned, local, torch.where(valid, torch.zeros_like(local), torch.full_like(local, KERNEL_IGNORE)))
    return lab, owned, valid


def _combine(stats, z, owned, valid, group):
    """Global (logp, backward statistics) from this shard's (m, s, r) and its logit at the local label."""
    m, s, r = stats.unbind(0)
    big_m = m.clone()
    dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
    zero = torch.zeros_like(m)
    # A shard whose row is all -inf (m = -inf) adds nothing; its s is exp(-inf + inf) = NaN, not 0.
    part = torch.where(m == float("-inf"), zero, torch.where(owned, r, s) * torch.exp(m - big_m))
    sums = torch.stack([part, torch.where(owned, z, zero)])
    dist.all_reduce(sums, group=group)
    rest, z_y = sums.unbind(0)
    total = rest + torch.exp(z_y - big_m)
    q = rest / total
    logp = torch.where(q < 0.5, torch.log1p(-q), (z_y - big_m) - torch.log(total))
    logp = torch.where(valid, logp, zero)
    label_term = torch.where(owned, rest, -torch.exp(z - big_m))  # see the module docstring
    ones = torch.ones_like(m)
    backward_stats = torch.stack([torch.where(valid, big_m, zero), torch.where(valid, total, ones),
                                  torch.where(valid, label_term, zero)])
    return logp, backward_stats


def _logit_at(rows, index):
    """rows[i, index[i]] of a [N, V] or [B, T, V] kernel operand."""
    i = torch.arange(index.shape[0], device=index.device)
    if rows.dim() == 3:
        return rows[i // rows.shape[1], i % rows.shape[1], index]
    return rows[i, index]


def _linear_logit_at(hidden, weight, bias, index, acc):
    """h_i . W[index_i] + b[index_i] in ``acc``, a block of rows at a time (memory flat in N)."""
    out = torch.empty(index.shape[0], dtype=acc, device=hidden.device)
    step = max(1, Z_LABEL_ROWS // max(1, hidden.shape[-1]))
    for r0 in range(0, index.shape[0], step):
        r = slice(r0, r0 + step)
        out[r] = torch.linalg.vecdot(hidden[r].to(acc), weight[index[r]].to(acc))
        if bias is not None:
            out[r] += bias[index[r]].to(acc)
    return out


class LogProbs(torch.autograd.Function):
    """Label log-probs of vocab-sharded logits rows; gradient w.r.t. this rank's shard."""

    @staticmethod
    def forward(ctx, rows, labels, ignore_index, backend, group, shard):
        lab, owned, valid = _local_labels(labels, ignore_index, shard.offset, rows.shape[-1])
        stats = ops.logprobs(rows, lab, KERNEL_IGNORE, backend)[1]
        z = _logit_at(rows, lab.clamp_min(0)).to(stats.dtype)
        logp, backward_stats = _combine(stats, z, owned, valid, group)
        ctx.save_for_backward(rows, lab, backward_stats)
        ctx.backend = backend
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        ops.refuse_double_backward()
        rows, lab, stats = ctx.saved_tensors
        grad = ops.logprobs_backward(grad_logp.contiguous(), rows, lab, stats, KERNEL_IGNORE, ctx.backend)
        return grad, None, None, None, None, None


class LinearLogProbs(torch.autograd.Function):
    """Label log-probs of ``hidden @ weight_shard.T + bias_shard``; gradients w.r.t. hidden (summed over the
    shards unless ``reduce_hidden_grad=False``), this rank's weight and bias shards."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, backend, group, shard, reduce_hidden_grad):
        lab, owned, valid = _local_labels(labels, ignore_index, shard.offset, weight.shape[0])
        stats = ops.linear_logprobs(hidden, weight, bias, lab, KERNEL_IGNORE, backend)[1]
        acc = acc_dtype(hidden, weight)
        z = _linear_logit_at(hidden, weight, bias, lab.clamp_min(0), acc)
        logp, backward_stats = _combine(stats.to(acc), z, owned, valid, group)
        ctx.save_for_backward(hidden, weight, bias, lab, backward_stats)
        ctx.backend, ctx.group, ctx.reduce = backend, group, reduce_hidden_grad
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        ops.refuse_double_backward()
        hidden, weight, bias, lab, stats = ctx.saved_tensors
        need = ctx.needs_input_grad
        dh, dw, db = ops.linear_logprobs_backward(grad_logp.contiguous(), hidden, weight, bias, lab, stats,
                                                  KERNEL_IGNORE, need[0], need[1] or need[2], ctx.backend)
        if need[0] and ctx.reduce:
            # Summed in fp32: each shard's share is rounded to the hidden dtype once, the sum once more.
            total = dh.to(stats.dtype)
            dist.all_reduce(total, group=ctx.group)
            dh = total.to(hidden.dtype)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None) + (None,) * 6


def logprobs(rows, labels, ignore_index, backend, group, name):
    shard = shard_of(group, rows.shape[-1], rows.dtype, labels, ignore_index, name)
    return LogProbs.apply(rows, labels, ignore_index, backend, group, shard)


def linear_logprobs(hidden, weight, bias, labels, ignore_index, backend, group, name, reduce_hidden_grad=True):
    shard = shard_of(group, weight.shape[0], weight.dtype, labels, ignore_index, name)
    return LinearLogProbs.apply(hidden, weight, bias, labels, ignore_index, backend, group, shard, reduce_hidden_grad)
