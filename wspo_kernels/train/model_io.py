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


def lm_head_inputs(model, input_ids, attention_mask=None, *, longest=None, **packed):
    """(hidden [B, T, H], lm_head weight [V, H], bias [V] or None) for ``linear_*`` losses.

    ``packed``: ``packed_kwargs`` of a packed batch (position_ids restarting per sequence, and
    FlashAttention's varlen kwargs where the model uses it), whose longest sequence (``longest``, an int)
    is what the context limit holds against."""
    check_supported(model)
    inner = _unwrap(model)
    limit = context_limit(inner.config)
    longest = longest or input_ids.shape[-1]
    if limit and longest > limit:
        raise ValueError(f"{type(inner).__name__} takes {limit} positions, the batch has {longest}: "
                         "truncate the rows (cutoff_len) first")
    with packed_attention(model) if packed else contextlib.nullcontext():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                    **packed, **_last_logits_kwarg(inner))
    head = inner.get_output_embeddings()
    _unshard_for_loss(inner, head)
    return out.hidden_states[-1], head.weight, getattr(head, "bias", None)


# ------------------------------------------------------------------------------------------ packed batches
# A packed batch is one row of several sequences; what keeps them apart is the model's business:
# transformers builds a block-diagonal causal mask from position_ids that restart at 0 (sdpa, eager, on
# any device; masking_utils.find_packed_sequence_indices) when no attention mask is given, and the
# FlashAttention implementations take the boundaries as varlen kwargs.  Layers that are not attention
# (convolutions, linear attention, state-space layers) carry state across a boundary regardless.
#
# That mask costs sdpa the whole N x N score matrix of the packed row (N = the micro-batch's tokens), more
# than the padded batch's B x T x T: on a CPU, a micro-batch of 8 UltraFeedback-like rows spent 58% of its
# step there and packing gained nothing.  So under sdpa the packed forward runs ``varlen_sdpa_attention``
# instead (registered with transformers' AttentionInterface, switched in only for that forward): one causal
# sdpa call per sequence, sum(L_i^2) work, the same values.
_VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
VARLEN_SDPA = "wspo_varlen_sdpa"


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          cu_seq_lens_q=None, **kwargs):
    """transformers' attention-function interface for one packed row: query ``[1, Hq, N, D]``, key and value
    ``[1, Hkv, N, D]`` -> ``[1, N, Hq, D]``, each sequence of ``cu_seq_lens_q`` attending causally to itself."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError(f"{VARLEN_SDPA} runs packed rows only (one row and cu_seq_lens_q)")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(f"{VARLEN_SDPA}: soft-capped attention scores are not supported")
    window = kwargs.get("sliding_window")  # a query sees the keys at most window - 1 positions back
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key / value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bounds = cu_seq_lens_q.tolist()
    p = dropout if module.training else 0.0
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
        if window is not None and b - a > window:
            i = torch.arange(b - a, device=query.device)
            band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
            parts.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=p,
                                                                          scale=scaling))
        else:
            parts.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                                          scale=scaling))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


try:  # transformers >= 4.48; before it, sdpa keeps transformers' own packed handling (or the probe refuses it)
    from transformers import AttentionInterface
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    _HAVE_VARLEN_SDPA = True
except ImportError:
    _HAVE_VARLEN_SDPA = False


def attention_implementation(model) -> str:
    return str(getattr(_unwrap(model).config, "_attn_implementation", None) or "eager")


def packed_kwargs(model, position_ids, cu_seqlens, max_seqlen):
    """The forward kwargs of a packed batch for ``model``: position_ids, and the varlen kwargs
    (``cu_seq_lens_q/k`` int32, ``max_length_q/k``) where the model runs FlashAttention or sdpa (which
    ``packed_attention`` then swaps for ``varlen_sdpa_attention``)."""
    kwargs = {"position_ids": position_ids}
    implementation = attention_implementation(model)
    if implementation in _VARLEN_IMPLEMENTATIONS or implementation.endswith("flash-attn") \
            or implementation.endswith("flash-attn3") or implementation == VARLEN_SDPA \
            or (implementation == "sdpa" and _HAVE_VARLEN_SDPA):
        cu = cu_seqlens.to(device=position_ids.device, dtype=torch.int32)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_seqlen, max_length_k=max_seqlen)
    return kwargs


@contextlib.contextmanager
def packed_attention(model):
    """For the forward of a packed row -- and, training, its backward, where checkpointed layers run their
    forward again -- sdpa becomes ``varlen_sdpa_attention``; the config is restored after it, so nothing
    saved names it.  Nested uses are no-ops."""
    config = _unwrap(model).config
    if attention_implementation(model) != "sdpa" or not _HAVE_VARLEN_SDPA:
        yield
        return
    config._attn_implementation = VARLEN_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


class PackingUnsupported(ValueError):
    """A model that lets packed sequences see each other."""


def check_keeps_boundaries(model, name: str) -> None:
    """Refuse a model that lets the sequences of a packed row see each other, before it trains on one.

    A probe, not a list of architectures: two packed rows [a, c] and [a', c] (a and a' different tokens,
    the same length) must give c the same logits; any attention implementation, convolution, linear
    attention or recurrent state that carries information across the boundary changes them.  One tiny
    forward pass of eight tokens each, without gradients, in eval mode (dropout off)."""
    inner = _unwrap(model)
    try:
        device = next(inner.parameters()).device
    except StopIteration:
        return
    vocab = getattr(inner.config, "vocab_size", None) or inner.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    first, second, shared = (torch.randint(1, vocab, (4,), generator=g) for _ in range(3))
    positions = torch.arange(4).repeat(2)[None].to(device)
    cu = torch.tensor([0, 4, 8])
    kwargs = packed_kwargs(inner, positions, cu, 4)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), packed_attention(inner):
            logits = [inner(input_ids=torch.cat([a, shared])[None].to(device), use_cache=False, **kwargs).logits[0, 4:]
                      for a in (first, second)]
    except (TypeError, ValueError, NotImplementedError) as e:  # no (or no usable) sequence boundaries
        raise PackingUnsupported(f"padding_free: {name} ({type(inner).__name__}) cannot run a packed row "
                                 f"({type(e).__name__}: {e}): train it with padded batches (padding_free: false)") from None
    finally:
        inner.train(was_training)
    if not torch.allclose(logits[0].float(), logits[1].float(), rtol=1e-3, atol=1e-4):
        leak = (logits[0].float() - logits[1].float()).abs().max().item()
        raise PackingUnsupported(
            f"padding_free: {name} ({type(inner).__name__}, attn_implementation={attention_implementation(inner)}) "
            f"lets packed sequences see each other (a sequence's logits moved by {leak:.3g} when its packed "
            "neighbour changed): train it with padded batches (padding_free: false)"
            + ("" if attention_implementation(inner) in ("sdpa", "eager") + _VARLEN_IMPLEMENTATIONS
               else ", or load it with attn_implementation sdpa, eager or flash_attention_2"))


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
