"""Prompt/response data for WSPO: tokenisation with -100 on the prompt, padding, truncation that never
leaves a response without a token silently.

WSPO needs only the preferred (chosen / SFT) responses: there is no rejected half to compute.
Precomputed frozen-model logps travel as the columns ``LOGPS_COLUMNS``, one value per position t of
``labels[1:]`` (the causal shift), and are padded with zeros like the labels.
"""
import logging
from typing import Optional

import torch

IGNORE_INDEX = -100
LOGPS_COLUMNS = {"ref": "ref_logps", "weak_aligned": "weak_aligned_logps", "weak_base": "weak_base_logps"}
log = logging.getLogger(__name__)


def tokenize_prompt_response(tokenizer, prompt: str, response: str, *, max_length: Optional[int] = None):
    """{"input_ids", "labels"} for one example, or None when no response token fits in ``max_length``.

    The prompt goes through the tokenizer's chat template when it has one.  Over-long examples lose
    prompt tokens from the left first, then response tokens from the right.
    """
    if getattr(tokenizer, "chat_template", None):
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   tokenize=True)
        if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
            prompt_ids = prompt_ids["input_ids"]
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return build_example(list(prompt_ids), list(response_ids), max_length=max_length)


def build_example(prompt_ids, response_ids, *, max_length: Optional[int] = None):
    """Token ids -> {"input_ids", "labels"}; None when no response token can be trained on."""
    if max_length is not None and len(prompt_ids) + len(response_ids) > max_length:
        keep_prompt = max(1, max_length - len(response_ids))
        prompt_ids = prompt_ids[-keep_prompt:]
        response_ids = response_ids[: max_length - len(prompt_ids)]
    if not prompt_ids or not response_ids:  # a response token needs a preceding position to be scored
        return None
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


class WSPODataCollator:
    """Pads tokenised examples (and any precomputed logps columns) into a batch.

    ``max_length`` truncates from the right; an example left without a response token is dropped and
    counted in ``dropped`` (with a warning), never passed on as an all-ignored row.
    """

    def __init__(self, pad_token_id: int, *, max_length: Optional[int] = None):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.dropped = 0

    def __call__(self, features):
        rows = []
        for f in features:
            ids, labels = list(f["input_ids"]), list(f["labels"])
            logps = {c: list(f[c]) for c in LOGPS_COLUMNS.values() if c in f}
            if self.max_length is not None and len(ids) > self.max_length:
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                logps = {c: v[: self.max_length - 1] for c, v in logps.items()}
            if all(y == IGNORE_INDEX for y in labels[1:]):
                self.dropped += 1
                log.warning("WSPODataCollator: dropped an example with no response token left (%d so far)",
                            self.dropped)
                continue
            rows.append((ids, labels, logps))
        if not rows:
            raise ValueError("every example in this batch was dropped: no response token within max_length")
        T = max(len(r[0]) for r in rows)
        batch = {
            "input_ids": torch.tensor([r[0] + [self.pad_token_id] * (T - len(r[0])) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r[0]) + [0] * (T - len(r[0])) for r in rows]),
            "labels": torch.tensor([r[1] + [IGNORE_INDEX] * (T - len(r[1])) for r in rows]),
        }
        for c in rows[0][2]:
            batch[c] = torch.tensor([r[2][c] + [0.0] * (T - 1 - len(r[2][c])) for r in rows], dtype=torch.float32)
        return batch
