"""``WSPOTrainer``: a ``transformers.Trainer`` that trains the strong policy with the fused WSPO loss.

- The policy loss is ``linear_wspo_loss`` on the final hidden states and the lm_head weight (tied or not,
  with its bias if it has one): the policy's full logits are never built.
- The frozen models are either resident (``ref_model``, ``weak_aligned_model``, ``weak_base_model``; the
  reference may be omitted for a PEFT policy: it is then the policy with its adapters disabled) or, better,
  precomputed offline (``precompute_logps``) and read from the batch columns ``LOGPS_COLUMNS``.
- Normalisation: the loss of an optimizer step is the mean over every sequence of the step, across
  gradient-accumulation micro-batches and data-parallel ranks: each micro-batch passes the global count
  as ``normalizer`` (divided by the world size, which DDP's gradient averaging restores), and the
  trainer does not divide by the accumulation steps again.  Same gradients as one big batch.
- Tensor-parallel heads (``vocab_group``): when each rank's lm_head (a ``ColumnParallelLinear``-style
  layer) holds a contiguous shard of the vocabulary, pass its process group; the loss combines the
  shards (``wspo_kernels.vocab_parallel``), frozen heads may be sharded the same way or precomputed.
- Padding-free batches (``padding_free=True``, TRL's and LLaMA-Factory's ``neat_packing``): each
  micro-batch's rows are packed into one row (``WSPODataCollator(padding_free=True)``), kept apart by
  per-sequence attention (sdpa: ``model_io.varlen_sdpa_attention``, in place through the backward), the
  block-diagonal mask transformers builds from position_ids that restart at 0 (eager), or FlashAttention's
  varlen kwargs, and handed to the loss with ``cu_seqlens``.  No attention mask, no padded positions.
  Every model is probed once when the trainer is built (``check_keeps_boundaries``; ZeRO-3: on the first
  step) and refused if packed sequences can see each other.  The normaliser and every metric keep their
  meaning (the official per-micro-batch means divide by the grid the rows would have padded to).
- Dropout is disabled in the policy and every frozen model (``disable_dropout=True``, as the official
  trainer does): two evaluations of one batch give one loss.
- Logged metrics: loss, mean Δs (strong log-ratio), mean Δw (weak log-ratio), the implicit reward
  γ·Δs, mean policy logp, each over response tokens; and, under the official trainer's names and
  definitions (per micro-batch means over the padded ``[B, T-1]`` grid, averaged over the logging
  window), ``rewards/chosen`` = γ·logp and ``logps/chosen``.  Every metric is summed over the
  data-parallel ranks before it is logged.
- A job may die at any instant: every checkpoint is opened with a marker and closed, once every rank has
  written and its files are on disk, with a completion record (``checkpoints``); a save that fails or is
  interrupted leaves no directory behind; ``resume_from_checkpoint=True`` takes the newest *complete*
  checkpoint; one training run per ``output_dir`` (a lock, held by the saving rank).  Resuming from a
  checkpoint already at the last step trains nothing (the plain Trainer runs one more step).
- Non-finite training stops (``stop_on_nonfinite=True``): before each optimizer step, the step's losses
  (a device flag per micro-batch) and the Trainer's own pre-clip gradient norm are checked -- one small
  all-reduce and one host read per optimizer step -- and a NaN / inf raises ``NonFiniteError`` before the
  weights change, so nothing non-finite is saved.  Under DeepSpeed, whose engine steps inside the
  backward, each micro-batch's loss is checked before its backward (its gradients are DeepSpeed's to
  check); under fp16 the grad scaler's own skipping stands.  On transformers without the
  ``on_pre_optimizer_step`` hook the check runs at the step's end: after the weights changed, before
  anything is saved.  Resident frozen models are checked for non-finite weights when the trainer is built.
"""
import contextlib
import os
import shutil
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput

from .. import linear_wspo_loss
from .._inputs import check_gamma
from . import checkpoints, storage
from .data import IGNORE_INDEX, LOGPS_COLUMNS, WSPODataCollator
from .model_io import (check_keeps_boundaries, check_supported, disable_dropout_in, gathered_for_loss, lm_head_inputs,
                       packed_attention, packed_kwargs)

ROLES = ("ref", "weak_aligned", "weak_base")
METRICS = ("tokens", "delta_strong", "delta_weak", "policy_logps", "micro_batches", "grid_logps")


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm of a training step is NaN or inf."""


class NonFiniteWeightsError(ValueError):
    """A resident frozen model holds NaN or inf weights."""


def nonfinite_weights(model):
    """(count, first parameter name) of NaN / inf values in a model's parameters; (0, None) if none."""
    total, first = 0, None
    with torch.no_grad():
        for name, p in model.named_parameters():
            bad = int((~torch.isfinite(p)).sum()) if p.is_floating_point() else 0
            total += bad
            first = first or (name if bad else None)
    return total, first


class _NothingToTrain(Exception):
    pass


class _Guard(TrainerCallback):
    """The trainer's checks at the Trainer's hooks: nothing left to train when training begins, and finite
    losses and gradients before each optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer._resuming and state.max_steps > 0 and state.global_step >= state.max_steps:
            raise _NothingToTrain()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.stop_on_nonfinite and not self.trainer.is_deepspeed_enabled:
            self.trainer._check_finite()

    if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # older transformers: before the step's save
        on_step_end = on_pre_optimizer_step


def count_sequences(labels: torch.Tensor, cu_seqlens=None) -> int:
    """Sequences with at least one response token after the causal shift (the mean's B'); of a packed
    batch (``cu_seqlens``) each sequence's first token is never a target."""
    if cu_seqlens is None:
        return int(((labels[:, 1:] != IGNORE_INDEX).sum(-1) > 0).sum())
    cu = cu_seqlens.long().cpu()  # once per optimizer step, on the host: the batch may already be on a GPU
    target = labels.reshape(-1).cpu() != IGNORE_INDEX
    target[cu[:-1][cu[:-1] < target.numel()]] = False
    seq = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])
    return int((torch.zeros(cu.numel() - 1).index_add_(0, seq, target.float()) > 0).sum())


def groups_by_length(args) -> bool:
    """``group_by_length`` (transformers < 5) or ``train_sampling_strategy: group_by_length`` (5 and later)."""
    return bool(getattr(args, "group_by_length", False)) or getattr(args, "train_sampling_strategy", None) == \
        "group_by_length"


class WSPOTrainer(Trainer):
    def __init__(self, model=None, args=None, *, gamma=0.1, ref_model=None, weak_aligned_model=None,
                 weak_base_model=None, backend=None, data_collator=None, disable_dropout=True, vocab_group=None,
                 stop_on_nonfinite=True, padding_free=False, **kwargs):
        if args is not None:
            args.remove_unused_columns = False  # the precomputed logps columns must reach compute_loss
        if padding_free and groups_by_length(args):
            raise ValueError("padding_free: group_by_length batches rows of similar lengths to cut padding; packed "
                             "batches have none, and sorting changes which rows share an optimizer step: drop one")
        if padding_free and isinstance(data_collator, WSPODataCollator) and not data_collator.padding_free:
            raise ValueError("padding_free: the data_collator pads: pass WSPODataCollator(..., padding_free=True)")
        # A packing collator makes a padding-free trainer: its models must be probed like any other's.
        padding_free = padding_free or bool(getattr(data_collator, "padding_free", False))
        if padding_free and getattr(args, "n_gpu", 1) > 1 and getattr(args, "local_rank", -1) == -1:
            raise ValueError("padding_free: torch.nn.DataParallel (several GPUs in one process) splits the packed row "
                             "along its batch dimension of 1: launch one process per GPU (torchrun)")
        if data_collator is None:
            pad = getattr(kwargs.get("processing_class"), "pad_token_id", None)
            pad = pad if pad is not None else getattr(getattr(model, "config", None), "pad_token_id", None)
            data_collator = WSPODataCollator(pad if pad is not None else 0, padding_free=padding_free)
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        self.args.remove_unused_columns = False  # also the default arguments Trainer made for args=None
        check_supported(model)
        self.gamma = check_gamma(gamma)
        self.backend = backend
        self.vocab_group = vocab_group   # tensor-parallel heads: each rank's lm_head holds a vocabulary shard
        self.frozen_models = {}
        for role, m in zip(ROLES, (ref_model, weak_aligned_model, weak_base_model)):
            if m is not None:
                check_supported(m)
                m = m.to(self.args.device).eval().requires_grad_(False)
                bad, first = nonfinite_weights(m)  # on the device: a pass over the weights, once
                if bad:
                    name = getattr(m, "name_or_path", "") or type(m).__name__
                    raise NonFiniteWeightsError(f"{role} ({name}) has {bad} non-finite weights (NaN / inf; the first "
                                                f"in {first}): its logps would be NaN")
            self.frozen_models[role] = m
        if disable_dropout:
            for m in (model, *self.frozen_models.values()):
                if m is not None:
                    disable_dropout_in(m)
        self.padding_free = padding_free
        self._unprobed = {}  # ZeRO-3 models hold placeholders until the engine runs them: probed on the first step
        if padding_free:  # before any step: a model that lets packed sequences see each other is refused
            for name, m in [("the policy", model)] + [(f"the {r} model", m) for r, m in self.frozen_models.items()]:
                if m is None:
                    continue
                if any(hasattr(p, "ds_id") for p in m.parameters()):
                    self._unprobed[name] = m
                else:
                    check_keeps_boundaries(m, name)
        self._num_sequences = None       # global sequence count of the current optimizer step
        self._hold_gathered = None       # training_step's stack of ZeRO-3 gathers, held through the backward
        self._metrics = {"train": defaultdict(float), "eval": defaultdict(float)}
        self.stop_on_nonfinite = stop_on_nonfinite
        self._nonfinite_loss = None      # device flag: a non-finite loss in the current optimizer step
        self._last_inputs = None         # the last micro-batch, for the message when the check fails
        self._resuming = False
        self._grad_norm = None           # the step's pre-clip gradient norm (a tensor), kept by _keep_grad_norm
        if stop_on_nonfinite:
            self._keep_grad_norm()
        self.add_callback(_Guard(self))

    # ------------------------------------------------------------------ normalisation
    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        n = sum(count_sequences(b["labels"], b.get("cu_seqlens")) for b in batch_samples)
        if self.args.world_size > 1:
            n = int(self.accelerator.gather(torch.tensor([n], device=self.args.device)).sum())
        self._num_sequences = n
        return batch_samples, num_items

    def train(self, resume_from_checkpoint=None, *args, overwrite_checkpoints=False, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest complete checkpoint;
        ``overwrite_checkpoints=True`` (not resuming) removes the checkpoints already in ``output_dir``."""
        output_dir = self.args.output_dir
        if resume_from_checkpoint is True:  # the newest *complete* checkpoint, not the newest directory
            resume_from_checkpoint = checkpoints.latest_complete(output_dir, log=storage.say)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint in {output_dir} to resume from")
        elif resume_from_checkpoint:
            reason = checkpoints.why_incomplete(resume_from_checkpoint)
            if reason is not None:
                raise ValueError(f"{resume_from_checkpoint} is incomplete ({reason}): resume from another checkpoint")
        self._resuming = bool(resume_from_checkpoint)
        with contextlib.ExitStack() as held:
            if self.args.should_save:  # one training run per output_dir: their checkpoints share names
                held.enter_context(storage.directory_lock(output_dir, wait=False, what=f"output_dir {output_dir}"))
                if overwrite_checkpoints and not resume_from_checkpoint:
                    checkpoints.remove_all(output_dir, log=storage.say)
                checkpoints.remove_incomplete(output_dir, log=storage.say)
            try:
                return super().train(resume_from_checkpoint, *args, **kwargs)
            except _NothingToTrain:
                self.is_in_train = False
                self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
                storage.say(f"{resume_from_checkpoint} is at step {self.state.global_step} of {self.state.max_steps}: "
                     "nothing left to train")
                return TrainOutput(self.state.global_step, 0.0, {"train_runtime": 0.0})
            except BaseException:
                for callback in self.callback_handler.callbacks:  # end the progress bar's line before a message
                    bar = getattr(callback, "training_bar", None)
                    if bar is not None:
                        bar.close()
                        callback.training_bar = None
                raise
            finally:
                self._num_sequences = None  # a later compute_loss outside training normalises by its own batch
                self._nonfinite_loss = self._last_inputs = self._grad_norm = None
                self._resuming = False

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial, *args, **kwargs):
        """The Trainer's checkpoint, written into a fresh directory marked as being written and closed with
        a completion record once every rank has written its part; older checkpoints are rotated out only
        after that (a kill in between leaves a complete one)."""
        run_dir = self._get_output_dir(trial=trial)
        path = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        limit = self.args.save_total_limit
        if self.args.should_save:
            shutil.rmtree(path, ignore_errors=True)  # leftovers of an interrupted save at this step
            with storage.writing(run_dir, os.path.basename(path)):
                checkpoints.mark_writing(path)
        self.accelerator.wait_for_everyone()
        self.args.save_total_limit = None  # the Trainer's rotation: after the record
        try:
            with storage.writing(run_dir, os.path.basename(path)):
                super()._save_checkpoint(model, trial, *args, **kwargs)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                checkpoints.mark_complete(path, self.state.global_step)
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(path, ignore_errors=True)  # nothing half-written stays where a resume would look
            raise
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save and limit:
            self._rotate(run_dir)

    def _rotate(self, run_dir):
        if hasattr(Trainer, "_rotate_checkpoints"):  # transformers 4
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
        else:
            from transformers.trainer_utils import rotate_checkpoints
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    # ------------------------------------------------------------------ non-finite steps
    def _keep_grad_norm(self):
        """The Trainer computes the step's pre-clip gradient norm with ``accelerator.clip_grad_norm_``
        (transformers 5: always; 4: when clipping); keep it for ``_check_finite`` instead of a second pass."""
        clip = self.accelerator.clip_grad_norm_

        def clip_and_keep(*args, **kwargs):
            norm = clip(*args, **kwargs)
            self._grad_norm = norm if isinstance(norm, torch.Tensor) else None
            return norm
        self.accelerator.clip_grad_norm_ = clip_and_keep

    def _check_finite(self):
        """Stop on a non-finite loss in the step or a non-finite gradient norm: before the optimizer step
        (under DeepSpeed, whose engine steps inside the backward, before each backward: losses only)."""
        flags = torch.zeros(2, device=self.args.device)
        if self._nonfinite_loss is not None:
            flags[0] = self._nonfinite_loss.float()
        # Under fp16 the grad scaler skips steps with inf gradients itself; DeepSpeed keeps its own gradients.
        if getattr(self.accelerator, "scaler", None) is None and not self.is_deepspeed_enabled:
            if self._grad_norm is not None:  # pre-clip, summed over the ranks by the Trainer
                flags[1] = (~torch.isfinite(self._grad_norm.detach())).float().to(flags.device)
            else:  # no clipping in this transformers: one pass over the local gradients
                grads = [p.grad for p in self.model.parameters() if p.grad is not None]
                grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
                if grads:
                    norms = torch._foreach_norm([g.detach().float() for g in grads])
                    flags[1] = (~torch.isfinite(torch.stack(norms).sum())).float().to(flags.device)
        if self.args.world_size > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        self._nonfinite_loss = self._grad_norm = None
        loss_bad, grad_bad = (bool(v > 0) for v in flags.tolist())  # one read per optimizer step
        if loss_bad or grad_bad:
            raise NonFiniteError(self._nonfinite_message(loss_bad, grad_bad))

    def _nonfinite_message(self, loss_bad, grad_bad):
        what = " and ".join(w for w, bad in (("loss", loss_bad), ("gradient norm", grad_bad)) if bad)
        step = self.state.global_step
        last = checkpoints.latest_complete(self.args.output_dir)
        causes = []
        bad, first = nonfinite_weights(self.model)
        if bad:
            causes.append(f"the policy has {bad} non-finite weights (the first in {first})")
        inputs = self._last_inputs or {}
        for role, column in LOGPS_COLUMNS.items():
            if column in inputs:
                n = int((~torch.isfinite(inputs[column])).sum())
                causes.append(f"the precomputed {column} hold {n} non-finite values" if n else "")
        cause = "; ".join(c for c in causes if c) or "no input is non-finite: the step diverged (learning rate, dtype)"
        verb = "are" if loss_bad and grad_bad else "is"
        return (f"the {what} {verb} not finite (NaN / inf) in step {step + 1}; training stopped before the optimizer "
                f"step, nothing was saved (last complete checkpoint: {last or 'none'}). Cause: {cause}. "
                "stop_on_nonfinite: false trains on")

    def _normalizer(self, model):
        if not model.training or self._num_sequences is None:
            return None  # evaluation: the mean over this batch
        return max(self._num_sequences, 1) / max(self.args.world_size, 1)

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        # ZeRO-3: compute_loss gathers the heads into this stack, so that they stay gathered through the
        # backward and the policy head's gradient accumulates into the full parameter, which ZeRO-3 then
        # reduce-scatters as it does for any module.
        try:
            with contextlib.ExitStack() as self._hold_gathered:
                if "cu_seqlens" in inputs:  # through the backward too: checkpointed layers rerun their forward there
                    self._hold_gathered.enter_context(packed_attention(model))
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, inputs)
                if self.stop_on_nonfinite:  # a device flag: read once per optimizer step (_check_finite)
                    bad = ~torch.isfinite(loss.detach())
                    self._nonfinite_loss = bad if self._nonfinite_loss is None else self._nonfinite_loss | bad
                    self._last_inputs = inputs
                    if self.is_deepspeed_enabled:  # its engine steps inside the backward: check before it
                        self._check_finite()
                if self._num_sequences is None:  # no step-wide count (older Trainer): per-micro-batch means
                    loss = loss / self.args.gradient_accumulation_steps
                # The loss is already normalised for the whole step: DeepSpeed must not divide it by the
                # accumulation steps again (its engine does by default).
                self.accelerator.backward(loss, **({"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}))
        finally:
            self._hold_gathered = None
        return loss.detach()

    # ------------------------------------------------------------------ the loss
    def _frozen(self, role, model, inputs):
        column = LOGPS_COLUMNS[role]
        if column in inputs:
            return inputs[column]
        frozen = self.frozen_models[role]
        adapters_off = None
        if frozen is None and role == "ref":
            peft_model = getattr(model, "module", model)
            if hasattr(peft_model, "disable_adapter"):
                frozen, adapters_off = model, peft_model.disable_adapter
        if frozen is None:
            raise ValueError(f"WSPOTrainer needs the {role} model or a precomputed '{column}' column")
        with torch.no_grad():
            if adapters_off is not None:
                with adapters_off():
                    parts = self._lm_head_inputs(frozen, inputs)
            else:
                parts = self._lm_head_inputs(frozen, inputs)
        hidden, weight, bias = parts
        return (hidden, weight) if bias is None else (hidden, weight, bias)

    def _lm_head_inputs(self, model, inputs):
        """``lm_head_inputs`` of a padded batch (with its attention mask), or of a packed one (its sequences
        kept apart by restarting position_ids or FlashAttention's varlen kwargs; hidden states ``[N, H]``)."""
        if "cu_seqlens" not in inputs:
            if self.padding_free:
                raise ValueError("padding_free: the batch is not packed (no cu_seqlens): use "
                                 "WSPODataCollator(..., padding_free=True)")
            return lm_head_inputs(model, inputs["input_ids"], inputs.get("attention_mask"))
        if not self.padding_free:
            raise ValueError("a packed batch (cu_seqlens) reached a WSPOTrainer built without padding_free=True: its "
                             "models were not checked for keeping packed sequences apart")
        if inputs.get("attention_mask") is not None:
            raise ValueError("padding_free: a packed batch carries an attention_mask; its sequences are kept apart by "
                             "the position_ids that restart at 0 (and cu_seqlens): drop the mask")
        while self._unprobed:  # ZeRO-3: every rank probes in the same order, the engine gathering each layer
            name, unprobed = self._unprobed.popitem()
            check_keeps_boundaries(unprobed, name)
        hidden, weight, bias = lm_head_inputs(
            model, inputs["input_ids"], longest=inputs["max_seqlen"],
            **packed_kwargs(model, inputs["position_ids"], inputs["cu_seqlens"], inputs["max_seqlen"]))
        return hidden.reshape(-1, hidden.shape[-1]), weight, bias

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hidden, weight, bias = self._lm_head_inputs(model, inputs)
        frozen = {role: self._frozen(role, model, inputs) for role in ROLES}
        labels, packed = inputs["labels"], {}
        if "cu_seqlens" in inputs:  # one row of packed sequences: flat [N] labels, logps and hidden states
            labels, packed = labels.reshape(-1), {"cu_seqlens": inputs["cu_seqlens"]}
            frozen = {role: f.reshape(-1) if isinstance(f, torch.Tensor) else f for role, f in frozen.items()}
        heads = [weight, bias] + [t for f in frozen.values() if isinstance(f, tuple) for t in f[1:]]
        with contextlib.ExitStack() as here:  # ZeRO-3: heads are partitioned outside their modules' forward
            (self._hold_gathered or here).enter_context(gathered_for_loss(heads))
            out = linear_wspo_loss(hidden, weight, labels, bias=bias, gamma=self.gamma,
                                   normalizer=self._normalizer(model), return_metrics=True, backend=self.backend,
                                   vocab_group=self.vocab_group, **packed, **frozen)
        self._record(out, "train" if model.training else "eval", inputs.get("grid_positions"))
        return (out.loss, {"policy_logps": out.policy_logps}) if return_outputs else out.loss

    # ------------------------------------------------------------------ metrics
    def _record(self, out, split, grid_positions=None):
        """Running sums on the device (no host sync per step); read once per log().  The official metrics
        are means over the padded [B, T-1] grid: a packed batch divides by the grid its rows would pad to."""
        store = self._metrics[split]
        store["tokens"] += out.mask.sum()
        store["delta_strong"] += out.strong_log_ratio.sum()   # the metrics are 0 on ignored tokens
        store["delta_weak"] += out.weak_log_ratio.sum()
        store["policy_logps"] += out.policy_logps.sum()
        store["micro_batches"] += 1
        if grid_positions is not None:
            store["grid_logps"] += out.policy_logps.sum() / max(grid_positions, 1)
        else:
            store["grid_logps"] += out.policy_logps.mean() if out.policy_logps.numel() else out.loss.new_zeros(())

    def log(self, logs, *args, **kwargs):
        split = "train" if self.model.training else "eval"
        store = self._metrics[split]
        # One tensor of the window's sums, summed over the data-parallel ranks (every rank logs), one read.
        dtype = torch.float32 if self.args.device.type == "mps" else torch.float64  # MPS has no float64
        sums = torch.stack([torch.as_tensor(store.get(k, 0.0), dtype=dtype, device=self.args.device) for k in METRICS])
        if self.args.world_size > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        store = dict(zip(METRICS, sums.tolist()))
        self._metrics[split].clear()
        prefix = "eval_" if split == "eval" else ""
        if store.get("tokens", 0) > 0:
            n = store["tokens"]
            logs[f"{prefix}wspo/delta_strong"] = store["delta_strong"] / n
            logs[f"{prefix}wspo/delta_weak"] = store["delta_weak"] / n
            logs[f"{prefix}wspo/implicit_reward"] = self.gamma * store["delta_strong"] / n
            logs[f"{prefix}wspo/policy_logps"] = store["policy_logps"] / n
        if store.get("micro_batches", 0) > 0:  # the official trainer's names and definitions
            logs[f"{prefix}logps/chosen"] = store["grid_logps"] / store["micro_batches"]
            logs[f"{prefix}rewards/chosen"] = self.gamma * store["grid_logps"] / store["micro_batches"]
        return super().log(logs, *args, **kwargs)
