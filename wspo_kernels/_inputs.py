"""Input checking and the flat row layout every backend works on.

Public functions accept ``[B, T, V]`` logits with ``[B, T]`` labels, or flat ``[N, V]`` / ``[N]``
(one sequence, or several packed ones described by ``cu_seqlens``).  Kernels only ever see rows:
a ``[N, V]`` view of the logits and ``[N]`` labels that are already shifted.  Shifting never
copies logits: the label of row t becomes ``labels[t + 1]`` and the last row of every sequence is
ignored, so ``logits[:, :-1]`` (a non-viewable slice) is never materialised.

Every check here looks only at shapes, dtypes and devices, so it traces under torch.compile; the
one data-dependent check (labels inside ``[0, V)``) runs inside the ops, before any kernel.
"""
import math
import numbers
import os
from typing import NamedTuple, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs (the verification dtype)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def check_labels_tensor(labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() not in (1, 2):
        raise ValueError(f"labels must be [B, T] or flat [N], got shape {tuple(labels.shape)}")


def check_same_device(labels: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != labels.device:
            raise ValueError(f"{name} is on {t.device} but labels are on {labels.device}")


def check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma must be a real number, got {type(gamma).__name__}")
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma}")
    return float(gamma)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_normalizer(normalizer, reduction: str):
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError("normalizer only applies to reduction='mean'")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or normalizer.dtype.is_complex or normalizer.dtype == torch.bool:
            raise ValueError("normalizer tensor must hold a single real number")
        return normalizer.reshape(()).float()
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(f"normalizer must be a number or a 1-element tensor, got {type(normalizer).__name__}")
    if not (math.isfinite(normalizer) and normalizer > 0):
        raise ValueError(f"normalizer must be finite and > 0, got {normalizer}")
    return float(normalizer)


LABEL_CHECK_ENV_VAR = "WSPO_KERNELS_CHECK_LABELS"


def check_labels_range(labels: torch.Tensor, ignore_index: int, **vocabs: int) -> None:
    """Labels must be ignore_index or in [0, V) for every model named in ``vocabs`` (name=V).

    Data-dependent: one host sync on a GPU however many models are checked (the smallest vocabulary
    decides), and ``WSPO_KERNELS_CHECK_LABELS=0`` skips it there for labels known to be valid (CPU
    tensors are always checked).
    """
    if labels.device.type != "cpu" and os.environ.get(LABEL_CHECK_ENV_VAR, "1") == "0":
        return
    smallest = min(vocabs.values())
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= smallest))
    if bool(bad.any()):
        first = int(labels[bad][0])
        name, vocab = min(((n, v) for n, v in vocabs.items() if not 0 <= first < v), key=lambda nv: nv[1])
        raise ValueError(
            f"labels must be in [0, {vocab}) for {name} (vocab size {vocab}) or equal ignore_index="
            f"{ignore_index}; found {first}")


class Layout(NamedTuple):
    """How the user's ``[B, T]`` / ``[N]`` token grid maps onto kernel rows ``[N]``."""
    labels: torch.Tensor           # [N] int64, shifted, ignore_index on rows without a target
    num_seqs: int                  # B
    seq_len: Optional[int]         # T for the [B, T] grid, None for flat / packed input
    seq_id: Optional[torch.Tensor]  # [N] sequence of each row (flat and packed input only)
    shift: bool
    ignore_index: int
    packed: bool                   # cu_seqlens given: per-token outputs keep all N rows

    @property
    def num_rows(self) -> int:
        return self.labels.shape[0]

    @property
    def grid(self):
        """Leading shape every per-token input (logits, hidden states) must have."""
        return (self.num_seqs, self.seq_len) if self.seq_len is not None else (self.num_rows,)

    @property
    def token_shape(self):
        """Shape of per-token outputs, exactly as token_logprobs returns them."""
        if self.seq_len is not None:
            return (self.num_seqs, self.seq_len - 1 if self.shift else self.seq_len)
        return (self.num_rows - 1 if self.shift and not self.packed else self.num_rows,)

    def to_user(self, x: torch.Tensor) -> torch.Tensor:
        """[N] row values -> per-token output shape (drops the shifted-out last position)."""
        if self.seq_len is not None:
            x = x.view(self.num_seqs, self.seq_len)
            return x[:, :-1] if self.shift else x
        return x[: self.token_shape[0]]

    def from_user(self, logps: torch.Tensor, name: str) -> torch.Tensor:
        """Per-token logps as token_logprobs returns them -> [N] rows (0 on rows without target)."""
        if tuple(logps.shape) != tuple(self.token_shape):
            raise ValueError(
                f"{name} per-token logps must have shape {tuple(self.token_shape)} (as token_logprobs "
                f"returns them with shift={self.shift}), got {tuple(logps.shape)}")
        full = self.seq_len if self.seq_len is not None else self.num_rows
        if logps.shape[-1] != full:
            logps = torch.nn.functional.pad(logps, (0, full - logps.shape[-1]))
        return logps.reshape(-1)

    def per_seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """[N] -> [B] sums over each sequence's rows."""
        if self.seq_len is not None:
            return x.view(self.num_seqs, self.seq_len).sum(-1)
        return x.new_zeros(self.num_seqs).index_add(0, self.seq_id, x)

    def token_weights(self, reduction: str, normalizer, dtype: torch.dtype) -> torch.Tensor:
        """w_t with sum_t w_t d_t^2 = the reduced loss: m_t / n_b, and / B' (or normalizer) for 'mean'."""
        mask = (self.labels != self.ignore_index).to(dtype)
        n = self.per_seq_sum(mask)
        per_row_n = (n.repeat_interleave(self.seq_len) if self.seq_len is not None else n[self.seq_id])
        w = mask / per_row_n.clamp_min(1.0)
        if reduction == "mean":
            denom = (n > 0).sum().clamp_min(1).to(dtype) if normalizer is None else normalizer
            w = w / denom
        return w


def make_layout(labels: torch.Tensor, *, shift: bool, ignore_index: int,
                cu_seqlens: Optional[torch.Tensor] = None) -> Layout:
    check_labels_tensor(labels)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    labels = labels.long()
    if cu_seqlens is not None:
        if labels.dim() != 1:
            raise ValueError("cu_seqlens requires flat [N] labels (packed sequences)")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
            raise ValueError("cu_seqlens must be a 1-D integer tensor [B + 1] of sequence boundaries")
        check_same_device(labels, cu_seqlens=cu_seqlens)
        if not torch.compiler.is_compiling():
            cu = cu_seqlens.long()
            if int(cu[0]) != 0 or int(cu[-1]) != labels.shape[0] or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"cu_seqlens must rise from 0 to N={labels.shape[0]}")
    n_rows = labels.numel()
    if labels.dim() == 2:
        B, T = labels.shape
        if shift:
            pad = labels.new_full((B, 1), ignore_index)
            labels = torch.cat([labels[:, 1:], pad], dim=1)
        return Layout(labels.reshape(-1), B, T, None, shift, ignore_index, False)
    if cu_seqlens is None:
        seq_id = labels.new_zeros(n_rows)
        num_seqs = 1
    else:
        cu = cu_seqlens.long()
        num_seqs = cu.numel() - 1
        seq_id = torch.repeat_interleave(torch.arange(num_seqs, device=labels.device), cu[1:] - cu[:-1],
                                         output_size=n_rows)
    if shift:
        nxt = torch.cat([labels[1:], labels.new_full((1,), ignore_index)])
        if cu_seqlens is not None:  # the last row of every packed sequence has no target
            last = torch.cat([seq_id[1:] != seq_id[:-1], seq_id.new_ones(1, dtype=torch.bool)])
            nxt = torch.where(last, torch.full_like(nxt, ignore_index), nxt)
        labels = nxt
    return Layout(labels, num_seqs, None, seq_id, shift, ignore_index, cu_seqlens is not None)


def rows_of(logits: torch.Tensor, layout: Layout, name: str) -> torch.Tensor:
    """Check ``logits`` against the label grid and view it as ``[N, V]`` rows (unit stride in V)."""
    check_float(logits, name)
    check_same_device(layout.labels, **{name: logits})
    grid = layout.grid
    if logits.dim() != len(grid) + 1 or tuple(logits.shape[:-1]) != grid:
        raise ValueError(f"{name} must have shape {grid + ('V',)} to match labels, got {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary")
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()
