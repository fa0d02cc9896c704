"""Input checking and the flat row layout every backend works on.

Public functions accept ``[B, T, V]`` logits with ``[B, T]`` labels, or flat ``[N, V]`` / ``[N]``
(one sequence, or several packed ones described by ``cu_seqlens``).  Kernels only ever see rows:
a ``[N, V]`` view of the logits and ``[N]`` labels that are already shifted.  Shifting never
copies logits: the label of row t becomes ``labels[t + 1]`` and the last row of every sequence is
ignored, so ``logits[:, :-1]`` (a non-viewable slice) is never materialised.

Layout rules (what kernels read in place, what is copied): logits are passed to the kernels as they
lie whenever their vocabulary has unit stride -- an ``[N, V]`` view when the rows have one stride
(vocab-sliced ``buf[..., :V]``, expanded ``[1, V] -> [N, V]``), else the ``[B, T, V]`` tensor itself,
whose rows the kernels address as (b, t) (transposed ``[T, B, V] -> [B, T, V]``, expanded batch).
Only logits with a strided vocabulary are copied.  An in-place gradient is written over the logits
when no two of their elements share memory (``writable_in_place``), into a fresh buffer otherwise.

Every check here looks only at shapes, dtypes and devices, so it traces under torch.compile; the
data-dependent checks (labels inside ``[0, V)``, a tensor ``normalizer`` > 0) raise before any kernel
on the CPU and are asynchronous device asserts on a GPU (no host synchronisation).
"""
import math
import numbers
import os
from typing import NamedTuple, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
STATS_ROWS = 3   # saved row statistics: max m, sum s of exp(z - m), the same sum r without the label's term
REDUCTIONS = ("mean", "sum", "none")


def acc_dtype(x: torch.Tensor, *others: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 when any input is float64 (the verification dtype)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in (x, *others)) else torch.float32


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


GAMMA_MAX = 1e6   # |gamma| above this overflows d^2 in fp32 for log-probs of a few hundred nats
INT64_RANGE = (-(2 ** 63), 2 ** 63 - 1)


def check_gamma(gamma):
    """A finite real with |gamma| <= GAMMA_MAX; a symbolic float (torch.compile dynamic=True) is checked at run time."""
    if isinstance(gamma, bool) or not isinstance(gamma, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"gamma must be a real number, got {type(gamma).__name__}")
    if torch.compiler.is_compiling():  # may be symbolic (dynamic=True): a runtime assertion, no guard
        torch._check(abs(gamma) <= GAMMA_MAX, lambda: f"gamma must be finite with |gamma| <= {GAMMA_MAX:g}")
        return gamma
    if not (math.isfinite(gamma) and abs(gamma) <= GAMMA_MAX):
        raise ValueError(f"gamma must be finite with |gamma| <= {GAMMA_MAX:g}, got {gamma}")
    return float(gamma)


def check_reduction(reduction: str) -> None:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not INT64_RANGE[0] <= int(ignore_index) <= INT64_RANGE[1]:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")


def _assert_tensor(ok: torch.Tensor, message: str) -> None:
    """Raise ValueError for a CPU tensor; an asynchronous device assert on a GPU or when traced (no sync)."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def check_normalizer(normalizer, reduction: str):
    if normalizer is None:
        return None
    if reduction != "mean":
        raise ValueError("normalizer only applies to reduction='mean'")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or normalizer.dtype.is_complex or normalizer.dtype == torch.bool:
            raise ValueError("normalizer tensor must hold a single real number")
        value = normalizer.detach().reshape(()).float()
        _assert_tensor(torch.isfinite(value) & (value > 0), "normalizer must be finite and > 0")
        return normalizer.reshape(()).float()
    if isinstance(normalizer, bool) or not isinstance(normalizer, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"normalizer must be a number or a 1-element tensor, got {type(normalizer).__name__}")
    if torch.compiler.is_compiling():  # may be symbolic (dynamic=True): a runtime assertion, no guard
        torch._check(normalizer > 0, lambda: "normalizer must be finite and > 0")
        return normalizer
    if not (math.isfinite(normalizer) and normalizer > 0):
        raise ValueError(f"normalizer must be finite and > 0, got {normalizer}")
    return float(normalizer)


LABEL_CHECK_ENV_VAR = "WSPO_KERNELS_CHECK_LABELS"


def check_labels_range(labels: torch.Tensor, ignore_index: int, **vocabs: int) -> None:
    """Labels must be ignore_index or in [0, V) for every model named in ``vocabs`` (name=V).

    CPU tensors: a ValueError naming the model and the first bad label.  GPU tensors: an asynchronous
    device assert (no host synchronisation, so the loss can be captured in a CUDA graph); a failure
    surfaces at the next synchronisation as a device-side assertion.  ``WSPO_KERNELS_CHECK_LABELS=0``
    skips the GPU check for labels known to be valid (CPU tensors are always checked).
    """
    name, smallest = "", None
    for n, v in vocabs.items():  # a plain loop: torch.compile traces it
        if smallest is None or v < smallest:
            name, smallest = n, v
    if labels.device.type != "cpu" or torch.compiler.is_compiling():
        if labels.device.type == "cpu" or os.environ.get(LABEL_CHECK_ENV_VAR, "1") != "0":
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= smallest))
            torch._assert_async(~bad.any(), f"labels must be in [0, {smallest}) for {name} (vocab size {smallest}) "
                                            f"or equal ignore_index={ignore_index}")
        return
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
            return (self.num_seqs, max(self.seq_len - 1, 0) if self.shift else self.seq_len)
        return (max(self.num_rows - 1, 0) if self.shift and not self.packed else self.num_rows,)

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


def _as_cu_seqlens(cu_seqlens, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(cu_seqlens, (list, tuple)):
        if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in cu_seqlens):
            raise TypeError("cu_seqlens as a list must hold ints")
        return torch.tensor([int(c) for c in cu_seqlens], dtype=torch.int64, device=labels.device)
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a 1-D integer tensor or a list of ints, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    return cu_seqlens


def make_layout(labels: torch.Tensor, *, shift: bool, ignore_index: int,
                cu_seqlens: Optional[torch.Tensor] = None) -> Layout:
    check_labels_tensor(labels)
    check_ignore_index(ignore_index)
    ignore_index = int(ignore_index)  # (a NumPy integer too)
    check_flag(shift, "shift")
    labels = labels.long().contiguous()  # kernels read labels with unit stride
    if cu_seqlens is not None:
        cu_seqlens = _as_cu_seqlens(cu_seqlens, labels)
        if labels.dim() != 1:
            raise ValueError("cu_seqlens requires flat [N] labels (packed sequences)")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D integer tensor [B + 1] of sequence boundaries")
        check_same_device(labels, cu_seqlens=cu_seqlens)
        if not torch.compiler.is_compiling():
            cu = cu_seqlens.long()
            if int(cu[0]) != 0 or int(cu[-1]) != labels.shape[0] or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"cu_seqlens must rise from 0 to N={labels.shape[0]}")
    n_rows = labels.numel()
    if labels.dim() == 2:
        B, T = labels.shape
        if shift and T:  # (an empty sequence has nothing to shift)
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
    if shift and n_rows:  # (an empty batch has nothing to shift)
        nxt = torch.cat([labels[1:], labels.new_full((1,), ignore_index)])
        if cu_seqlens is not None:  # the last row of every packed sequence has no target
            last = torch.cat([seq_id[1:] != seq_id[:-1], seq_id.new_ones(1, dtype=torch.bool)])
            nxt = torch.where(last, torch.full_like(nxt, ignore_index), nxt)
        labels = nxt
    return Layout(labels, num_seqs, None, seq_id, shift, ignore_index, cu_seqlens is not None)


def rows_of(logits: torch.Tensor, layout: Layout, name: str) -> torch.Tensor:
    """Check ``logits`` against the label grid; the kernels' operand: ``[N, V]`` rows or ``[B, T, V]``.

    Unit stride along V is the one requirement (a strided vocabulary is copied); otherwise the
    tensor's memory is used as it is (see the module docstring).
    """
    check_float(logits, name)
    check_same_device(layout.labels, **{name: logits})
    grid = layout.grid
    if logits.dim() != len(grid) + 1 or tuple(logits.shape[:-1]) != grid:
        raise ValueError(f"{name} must have shape {grid + ('V',)} to match labels, got {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 2 or _rows_share_one_stride(logits):
        return logits.view(-1, logits.shape[-1])
    return logits  # rows without one common stride: the kernels address them as (b, t)


def _rows_share_one_stride(x: torch.Tensor) -> bool:
    """Whether [B, T, V] rows can be viewed as [B * T, V] (decided from strides: traces under compile)."""
    B, T = x.shape[0], x.shape[1]
    return B <= 1 or T <= 1 or x.stride(0) == T * x.stride(1)


def num_rows(x: torch.Tensor) -> int:
    """Rows of a kernel operand ([N, V] or [B, T, V])."""
    return x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]


def writable_in_place(x: torch.Tensor) -> bool:
    """True when no two elements of ``x`` share memory, so a gradient can be written over it.

    Sufficient test: along the dimensions sorted by stride, each stride covers the span of the
    ones below it (an expanded or otherwise overlapping view fails and gets a fresh buffer).
    """
    if x.stride(-1) != 1:
        return False
    span = x.shape[-1]
    for stride, size in sorted((x.stride(d), x.shape[d]) for d in range(x.dim() - 1) if x.shape[d] > 1):
        if stride < span:
            return False
        span = stride * size
    return True
