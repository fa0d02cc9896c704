"""Final hidden states and lm_head of a causal LM, without computing its full logits.

The model is called through its own forward (so DDP / PEFT wrappers do their work) with
``output_hidden_states=True`` and logits for only the last position (``logits_to_keep=1``); the last
entry of ``hidden_states`` is the post-norm state that the lm_head multiplies.  Heads that transform the
logits beyond ``h W^T + b`` (a logit scale, a final soft-cap) are refused rather than silently ignored.
"""
import contextlib
import inspect

import torch


def _unwrap(model):
    """The underlying ``...ForCausalLM`` of a DDP / PEFT wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def check_supported(model) -> None:
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        raise NotImplementedError(f"{type(inner).__name__} soft-caps its logits (final_logit_softcapping): the fused "
                                  "loss assumes logits = h W^T + b")
    scale = getattr(inner, "logit_scale", None) or getattr(config, "logit_scale", None)
    if scale not in (None, 1, 1.0):
        raise NotImplementedError(f"{type(inner).__name__} scales its logits (logit_scale={scale}): not supported")
    if inner.get_output_embeddings() is None:
        raise ValueError(f"{type(inner).__name__} has no output embeddings (lm_head)")


def context_limit(config):
    """Positions a model takes; None when the config does not say.  With RoPE scaling: the original
    context times the factor when the config names it (yarn, llama3: ``max_position_embeddings`` may
    already be the extended one), else ``max_position_embeddings`` times the factor (linear, dynamic)."""
    limit = getattr(config, "max_position_embeddings", None)
    scaling = getattr(config, "rope_scaling", None) or {}
    if limit and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        original = scaling.get("original_max_position_embeddings")
        extended = int((original or limit) * scaling.get("factor", 1))
        limit = max(limit, extended) if original else extended
    return limit


def disable_dropout_in(model) -> None:
    """Dropout off everywhere: ``nn.Dropout`` modules (LoRA's included) and the float dropout rates that
    attention implementations read at run time (``attention_dropout`` of Llama, Qwen2, ...)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)


def _last_logits_kwarg(inner):
    params = inspect.signature(inner.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def lm_head_inputs(model, input_ids, attention_mask=None):
    """(hidden [B, T, H], lm_head weight [V, H], bias [V] or None) for ``linear_*`` losses."""
    check_supported(model)
    inner = _unwrap(model)
    limit = context_limit(inner.config)
    if limit and input_ids.shape[-1] > limit:
        raise ValueError(f"{type(inner).__name__} takes {limit} positions, the batch has {input_ids.shape[-1]}: "
                         "truncate the rows (cutoff_len) first")
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                **_last_logits_kwarg(inner))
    head = inner.get_output_embeddings()
    _unshard_for_loss(inner, head)
    return out.hidden_states[-1], head.weight, getattr(head, "bias", None)


@contextlib.contextmanager
def gathered_for_loss(params):
    """DeepSpeed ZeRO-3 keeps a parameter partitioned (an empty placeholder) outside its module's forward;
    the fused loss reads the lm_head weights directly, so they are all-gathered around it
    (``deepspeed.zero.GatheredParameters``): for the forward of frozen heads, and through the backward
    for the policy's (the trainer's training step), whose gradient then accumulates into the full
    parameter and is reduce-scattered by ZeRO-3 as any other.  A no-op without ZeRO-3, and for
    parameters already available (a head tied to the embeddings)."""
    todo = []
    for p in params:  # unique (a LoRA reference shares the policy's head) and partitioned
        if p is not None and hasattr(p, "ds_id") and all(p is not q for q in todo) \
                and getattr(p.ds_status, "name", "") != "AVAILABLE":
            todo.append(p)
    if not todo:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(todo):
        yield


def _unshard_for_loss(inner, head):
    """Under FSDP2 the head's parameters are full tensors after the model's forward when the head is in
    the root's unit (the root is not resharded after forward), but a DTensor shard when the head has a
    unit of its own.  Unsharding that unit through FSDP (``FSDPModule.unshard``) makes ``head.weight``
    the all-gathered parameter for the loss; FSDP reduce-scatters its gradient into the shard after
    the backward and reshards it, as for any module it unsharded."""
    if not type(head.weight).__name__ == "DTensor":
        return
    from torch.distributed.fsdp import FSDPModule
    head_name = next(name for name, m in inner.named_modules() if m is head)
    owners = [(name, m) for name, m in inner.named_modules()
              if isinstance(m, FSDPModule) and (name == "" or head_name == name or head_name.startswith(name + "."))]
    if not owners:
        raise NotImplementedError(f"{type(head).__name__}.weight is a DTensor outside an FSDP2 unit (tensor "
                                  "parallelism?): pass the vocabulary shard with vocab_group instead")
    max(owners, key=lambda nm: len(nm[0]))[1].unshard()
