"""Trainer glue: a Hugging Face ``WSPOTrainer``, offline precompute of the frozen models, data collation.

    from wspo_kernels.train import WSPOTrainer, WSPODataCollator, precompute_logps

Needs ``transformers`` (and ``datasets`` for precompute): ``pip install wspo-kernels[train]``.
"""
from .data import LOGPS_COLUMNS, WSPODataCollator, tokenize_prompt_response
from .model_io import lm_head_inputs
from .precompute import NonFiniteLogpsError, precompute_logps
from .trainer import NonFiniteError, NonFiniteWeightsError, WSPOTrainer

__all__ = ["WSPOTrainer", "WSPODataCollator", "tokenize_prompt_response", "precompute_logps", "lm_head_inputs",
           "LOGPS_COLUMNS", "NonFiniteError", "NonFiniteWeightsError", "NonFiniteLogpsError"]
