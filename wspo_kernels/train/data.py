"""Prompt/response data for WSPO: tokenisation with -100 on the prompt, the official truncation, padding
or packing.

WSPO needs only the preferred (chosen / SFT) responses: there is no rejected half to compute.
Precomputed frozen-model logps travel as the columns ``LOGPS_COLUMNS``, one value per position t of
``labels[1:]`` (the causal shift), and are padded with zeros like the labels.

Truncation to ``cutoff_len`` (``TRUNCATIONS``):
- ``"infer_seqlen"`` (default): the official recipe's rule (LLaMA-Factory's ``infer_seqlen``): keep the
  *start* of the prompt and of the response and split the budget between them (a response shorter than
  half the budget is kept whole, likewise a short prompt; otherwise in proportion to their lengths).
- ``"prompt_left"``: drop prompt tokens from the left first (keep the end of the prompt, next to the
  response), then response tokens from the right; with a preference pair, the prompt is cut for the
  longer response, so both halves keep the same prompt.
"""
from typing import Optional

import torch

IGNORE_INDEX = -100
LOGPS_COLUMNS = {"ref": "ref_logps", "weak_aligned": "weak_aligned_logps", "weak_base": "weak_base_logps"}
TRUNCATIONS = ("infer_seqlen", "prompt_left")


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int):
    """(prompt, response) lengths kept under ``cutoff_len`` by the official rule."""
    if target_len * 2 < cutoff_len:  # a short response is kept whole
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # a short prompt is kept whole
        max_target_len = cutoff_len - source_len
    else:  # both long: in proportion
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def build_example(prompt_ids, response_ids, *, max_length: Optional[int] = None, truncation: str = "infer_seqlen",
                  paired_len: int = 0):
    """Token ids -> {"input_ids", "labels"}; None when no response token can be trained on.

    ``paired_len``: the length of the rejected response of a preference pair; the official rule budgets
    the response as the longer of the two (the rejected half itself is not trained on).
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    prompt_ids, response_ids = list(prompt_ids), list(response_ids)
    budget = max(len(response_ids), paired_len)
    if max_length is not None and len(prompt_ids) + budget > max_length:
        if truncation == "infer_seqlen":
            n_prompt, n_response = infer_seqlen(len(prompt_ids), budget, max_length)
            prompt_ids, response_ids = prompt_ids[:n_prompt], response_ids[:n_response]
        else:  # the prompt cut by the pair's longer response, so both halves keep the same prompt
            prompt_ids = prompt_ids[-max(1, max_length - budget):]
            response_ids = response_ids[: max_length - len(prompt_ids)]
    if not prompt_ids or not response_ids:  # a response token needs a preceding position to be scored
        return None
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def _token_ids(encoded):
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "input_ids") else encoded)


def encode_prompt_response(tokenizer, prompt, response: str, *, chat_template: Optional[bool] = None):
    """(prompt ids, response ids) of one example; ``prompt`` is a string or a list of chat messages.

    With a chat template (the tokenizer's, used when it has one unless ``chat_template=False``) the
    response ids are the template's rendering of the assistant turn up to its end-of-turn token (the
    tokenizer's EOS; what a template renders after it, such as ChatML's newline, is not trained on);
    without one, the prompt is tokenised with the tokenizer's special tokens and the response gets EOS.
    """
    use_template = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if use_template:
        prompt_ids = _token_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        full = _token_ids(tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                        tokenize=True))
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            response_ids = full[len(prompt_ids):]
            eos = tokenizer.eos_token_id
            if eos in response_ids:
                response_ids = response_ids[: response_ids.index(eos) + 1]
            return prompt_ids, response_ids
    else:
        text = "\n".join(m["content"] for m in messages)
        prompt_ids = _token_ids(tokenizer(text, add_special_tokens=True))
    response_ids = _token_ids(tokenizer(response, add_special_tokens=False))
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def tokenize_prompt_response(tokenizer, prompt, response: str, *, max_length: Optional[int] = None,
                             truncation: str = "infer_seqlen", chat_template: Optional[bool] = None):
    """{"input_ids", "labels"} for one example, or None when no response token fits in ``max_length``."""
    prompt_ids, response_ids = encode_prompt_response(tokenizer, prompt, response, chat_template=chat_template)
    return build_example(prompt_ids, response_ids, max_length=max_length, truncation=truncation)


class WSPODataCollator:
    """Pads tokenised examples (and any precomputed logps columns) into a batch, or packs them.

    A row without a response token passes through as an all-ignored row: it contributes nothing and is
    left out of the loss's mean (drop such rows once, when the dataset is prepared; the CLI does).
    ``max_length`` truncates from the right (counted in ``truncated``); ``pad_to_multiple_of`` pads the
    sequence length as the official collator does (8), up to ``max_length``.

    ``padding_free=True`` packs instead (``pack``): the rows are concatenated into one ``[1, N]`` row with
    ``position_ids`` restarting at 0 for each, no attention mask, and ``cu_seqlens`` [B + 1] (int64) for
    the fused loss; ``max_seqlen`` (an int) for FlashAttention's varlen kwargs, and ``grid_positions`` (the
    ``B x (T - 1)`` positions the padded batch would have) for the official per-micro-batch metrics.
    """

    def __init__(self, pad_token_id: int, *, max_length: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = None, padding_free: bool = False):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = padding_free
        self.truncated = 0

    def _padded_length(self, rows):
        T = max(len(r[0]) for r in rows)
        if self.pad_to_multiple_of:  # never past max_length: a model's context may not be a multiple
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
            T = T if self.max_length is None else min(T, self.max_length)
        return T

    def pack(self, rows):
        """(ids, labels, logps) rows -> one packed row.  Precomputed logps (T_i - 1 values per row, one per
        target) get a 0 at each row's last position, where a packed sequence has no target."""
        ids = [t for r in rows for t in r[0]]
        cu = [0]
        for r in rows:
            cu.append(cu[-1] + len(r[0]))
        batch = {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([[p for r in rows for p in range(len(r[0]))]]),
            "labels": torch.tensor([[t for r in rows for t in r[1]]]),
            "cu_seqlens": torch.tensor(cu, dtype=torch.int64),
            "max_seqlen": max(len(r[0]) for r in rows),
            "grid_positions": len(rows) * (self._padded_length(rows) - 1),
        }
        for c in rows[0][2]:
            batch[c] = torch.tensor([[v for r in rows for v in r[2][c] + [0.0]]], dtype=torch.float32)
        return batch

    def __call__(self, features):
        rows = []
        for f in features:
            ids, labels = list(f["input_ids"]), list(f["labels"])
            logps = {c: list(f[c]) for c in LOGPS_COLUMNS.values() if c in f}
            if self.max_length is not None and len(ids) > self.max_length:
                self.truncated += 1
                ids, labels = ids[: self.max_length], labels[: self.max_length]
                logps = {c: v[: self.max_length - 1] for c, v in logps.items()}
            rows.append((ids, labels, logps))
        if self.padding_free:
            return self.pack(rows)
        T = self._padded_length(rows)
        batch = {
            "input_ids": torch.tensor([r[0] + [self.pad_token_id] * (T - len(r[0])) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r[0]) + [0] * (T - len(r[0])) for r in rows]),
            "labels": torch.tensor([r[1] + [IGNORE_INDEX] * (T - len(r[1])) for r in rows]),
        }
        for c in rows[0][2]:
            batch[c] = torch.tensor([r[2][c] + [0.0] * (T - 1 - len(r[2][c])) for r in rows], dtype=torch.float32)
        return batch
