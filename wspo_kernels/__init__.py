"""wspo-kernels: fused, exact kernels for the Weak-to-Strong Preference Optimization loss.

    import wspo_kernels as wk
    loss = wk.wspo_loss(policy_logits, labels, ref=ref_logits, weak_aligned=a_logits, weak_base=w_logits)
    loss = wk.linear_wspo_loss(hidden, lm_head.weight, labels, ref=ref_logps, weak_aligned=..., weak_base=...)
"""
from .api import (WSPOOutput, linear_token_logprobs, linear_wspo_loss, token_logprobs, weak_log_ratio,
                  wspo_loss)
from .backends.native import cached_bytes, empty_cache
from .dispatch import CHOICES as BACKENDS, ENV_VAR as BACKEND_ENV_VAR, select_backend
from .modules import LinearWSPOLoss, WSPOLoss

__version__ = "0.1.0"

__all__ = ["token_logprobs", "linear_token_logprobs", "weak_log_ratio", "wspo_loss", "linear_wspo_loss",
           "WSPOLoss", "LinearWSPOLoss", "WSPOOutput", "BACKENDS", "BACKEND_ENV_VAR", "select_backend",
           "empty_cache", "cached_bytes"]
