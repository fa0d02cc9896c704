"""Float64 reference of the WSPO loss, written plainly (DESIGN.md section 1).

This is the ground truth of the test-suite: full ``log_softmax`` in float64 for every model, no
chunking, no fusion.  It is deliberately slow and memory-hungry; never call it on real shapes.

    l^m_t = z^m_{t, y_t} - logsumexp_v z^m_{t, v}
    d_t   = gamma * (l^policy_t - l^ref_t) - (l^aligned_t - l^base_t)
    L_b   = (1 / n_b) * sum_t m_bt * d_bt^2            (0 when n_b == 0)
    L     = (1 / B') * sum_b L_b                        (B' = sequences with n_b > 0, or `normalizer`)
"""
import torch

__all__ = ["reference_token_logprobs", "reference_wspo_loss"]


def _shifted(x: torch.Tensor, labels: torch.Tensor, shift: bool):
    if shift:
        return x[..., :-1, :] if x.dim() == labels.dim() + 1 else x, labels[..., 1:]
    return x, labels


def reference_token_logprobs(logits, labels, *, ignore_index=-100, shift=False, dtype=torch.float64):
    """Per-token label log-probabilities ``[..., T(-1)]`` in ``dtype``, 0 where ignored."""
    logits, labels = _shifted(logits, labels, shift)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    logp = torch.log_softmax(logits.to(dtype), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, logp, torch.zeros_like(logp))


def _as_logps(x, labels, ignore_index, shift, dtype):
    """Frozen inputs may be logits ``[..., V]`` or per-token logps as token_logprobs returns them."""
    if x.dim() == labels.dim() + 1:
        return reference_token_logprobs(x, labels, ignore_index=ignore_index, shift=shift, dtype=dtype)
    return x.to(dtype)


def reference_wspo_loss(policy_logits, labels, *, ref, weak_aligned, weak_base, gamma=0.1,
                        ignore_index=-100, shift=True, reduction="mean", normalizer=None,
                        dtype=torch.float64):
    """The WSPO loss of DESIGN.md section 1 for ``[B, T, V]`` (or ``[T, V]``: one sequence) inputs."""
    if labels.dim() == 1:  # flat input is one sequence
        return reference_wspo_loss(
            policy_logits.unsqueeze(0), labels.unsqueeze(0),
            ref=ref.unsqueeze(0), weak_aligned=weak_aligned.unsqueeze(0), weak_base=weak_base.unsqueeze(0),
            gamma=gamma, ignore_index=ignore_index, shift=shift, reduction=reduction,
            normalizer=normalizer, dtype=dtype)
    lp = reference_token_logprobs(policy_logits, labels, ignore_index=ignore_index, shift=shift, dtype=dtype)
    lr = _as_logps(ref, labels, ignore_index, shift, dtype)
    la = _as_logps(weak_aligned, labels, ignore_index, shift, dtype)
    lw = _as_logps(weak_base, labels, ignore_index, shift, dtype)
    mask = (labels[..., 1:] if shift else labels) != ignore_index
    d = gamma * (lp - lr) - (la - lw)
    n = mask.sum(-1)
    per_seq = (mask * d * d).sum(-1) / n.clamp_min(1)
    if reduction == "none":
        return per_seq
    if reduction == "sum":
        return per_seq.sum()
    denom = normalizer if normalizer is not None else (n > 0).sum().clamp_min(1)
    return per_seq.sum() / denom
