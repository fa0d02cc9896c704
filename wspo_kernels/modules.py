"""nn.Module forms of the losses: options fixed (and checked) at construction, tensors at call time."""
import torch

from ._inputs import check_flag, check_gamma, check_ignore_index, check_reduction
from .api import linear_wspo_loss, wspo_loss
from .dispatch import check_choice

__all__ = ["WSPOLoss", "LinearWSPOLoss"]


class _WSPOBase(torch.nn.Module):
    def __init__(self, *, gamma=0.1, ignore_index=-100, shift=True, reduction="mean", vocab_group=None, backend=None):
        super().__init__()
        self.gamma = check_gamma(gamma)
        check_ignore_index(ignore_index)
        check_flag(shift, "shift")
        check_reduction(reduction)
        check_choice(backend)
        self.ignore_index, self.shift, self.reduction, self.backend = ignore_index, shift, reduction, backend
        self.vocab_group = vocab_group  # a torch.distributed process group over which the vocabulary is sharded

    def _options(self):
        return dict(gamma=self.gamma, ignore_index=self.ignore_index, shift=self.shift, reduction=self.reduction,
                    vocab_group=self.vocab_group, backend=self.backend)

    def extra_repr(self):
        return f"gamma={self.gamma}, ignore_index={self.ignore_index}, shift={self.shift}, reduction={self.reduction!r}"


class WSPOLoss(_WSPOBase):
    """``WSPOLoss(gamma=0.1)(policy_logits, labels, ref=..., weak_aligned=..., weak_base=...)``.

    Takes every option of :func:`wspo_loss`, including ``inplace_grad``.
    """

    def __init__(self, *, gamma=0.1, ignore_index=-100, shift=True, reduction="mean", inplace_grad=False,
                 vocab_group=None, backend=None):
        super().__init__(gamma=gamma, ignore_index=ignore_index, shift=shift, reduction=reduction,
                         vocab_group=vocab_group, backend=backend)
        check_flag(inplace_grad, "inplace_grad")
        if inplace_grad and vocab_group is not None:
            raise ValueError("inplace_grad=True is not supported with vocab_group")
        self.inplace_grad = inplace_grad

    def forward(self, policy_logits, labels, *, ref, weak_aligned, weak_base, normalizer=None, cu_seqlens=None,
                return_metrics=False):
        return wspo_loss(policy_logits, labels, ref=ref, weak_aligned=weak_aligned, weak_base=weak_base,
                         normalizer=normalizer, cu_seqlens=cu_seqlens, return_metrics=return_metrics,
                         inplace_grad=self.inplace_grad, **self._options())

    def extra_repr(self):
        return super().extra_repr() + (", inplace_grad=True" if self.inplace_grad else "")


class LinearWSPOLoss(_WSPOBase):
    """``LinearWSPOLoss()(hidden, lm_head.weight, labels, ref=..., ...)``: logits are never materialised.

    With ``vocab_group``, ``reduce_hidden_grad=False`` leaves the sum of the hidden-state gradient over
    the group to the caller's framework (as Megatron's tensor-parallel regions do).
    """

    def __init__(self, *, gamma=0.1, ignore_index=-100, shift=True, reduction="mean", vocab_group=None,
                 reduce_hidden_grad=True, backend=None):
        super().__init__(gamma=gamma, ignore_index=ignore_index, shift=shift, reduction=reduction,
                         vocab_group=vocab_group, backend=backend)
        check_flag(reduce_hidden_grad, "reduce_hidden_grad")
        self.reduce_hidden_grad = reduce_hidden_grad

    def forward(self, policy_hidden, lm_head_weight, labels, *, ref, weak_aligned, weak_base, bias=None,
                normalizer=None, cu_seqlens=None, return_metrics=False):
        return linear_wspo_loss(policy_hidden, lm_head_weight, labels, ref=ref, weak_aligned=weak_aligned,
                                weak_base=weak_base, bias=bias, normalizer=normalizer, cu_seqlens=cu_seqlens,
                                return_metrics=return_metrics, reduce_hidden_grad=self.reduce_hidden_grad,
                                **self._options())
