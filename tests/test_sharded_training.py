"""WSPOTrainer under the engines that shard the policy, on 2 gloo CPU processes against one process on the
union batch: the same step loss and the same parameters after one optimizer step, with precomputed logps
and with resident frozen models, tied and untied heads, gradient accumulation 2.

- FSDP2: accelerate's fully_shard preparation, as ``fsdp`` / ``fsdp_config: {fsdp_version: 2}`` exposes it;
- DeepSpeed ZeRO-3 (its CPU accelerator): the lm_head is an empty placeholder outside its module's forward,
  and the engine would divide the step-normalised loss by the accumulation steps a second time.
"""
import importlib.util
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
HAS_FSDP2 = torch.distributed.is_available() and hasattr(importlib.import_module("torch.distributed.fsdp"), "fully_shard")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None

from train_fixtures import examples, frozen_models, tiny  # noqa: E402

ROWS = 8  # one optimizer step: 2 ranks x 2 rows x accumulation 2 = 1 process x 8 rows


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(out, world, engine, wrap):
    from transformers import TrainingArguments
    micro = ROWS // (2 * world)
    kw = dict(output_dir=out, report_to=[], use_cpu=True, save_strategy="no", max_steps=1, learning_rate=0.5,
              optim="sgd", lr_scheduler_type="constant", max_grad_norm=1e9, seed=0, logging_steps=1,
              per_device_train_batch_size=micro, gradient_accumulation_steps=2)
    if world > 1 and engine == "fsdp2":
        kw.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                                  "transformer_layer_cls_to_wrap": list(wrap)})
    elif world > 1 and engine == "zero3":
        # Persistence threshold 0: DeepSpeed keeps parameters below 1e5 elements whole by default, and the tiny
        # heads here would never be partitioned.
        kw.update(deepspeed={"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                             "train_micro_batch_size_per_gpu": micro,
                             "gradient_accumulation_steps": 2, "train_batch_size": ROWS, "gradient_clipping": 1e9})
    return TrainingArguments(**kw)


def _fsdp_on_cpu():
    """accelerate takes its FSDP path only for accelerator device types and falls back to DDP for CPU
    processes; marking the (gloo, CPU) group as a GPU-type one makes it run its FSDP2 preparation
    (fully_shard per decoder layer and the root) on CPU tensors, which FSDP2 itself supports."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    PartialState()._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def _full_parameters(trainer, engine):
    from torch.distributed.tensor import DTensor
    if engine == "zero3" and torch.distributed.is_initialized():
        import deepspeed
        assert all(hasattr(p, "ds_id") and not p.ds_persist for p in trainer.model.parameters()), \
            "ZeRO-3 did not partition every parameter"
        with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
            return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert engine != "fsdp2" or not torch.distributed.is_initialized() or all(
        isinstance(p, DTensor) for p in trainer.model.parameters()), "FSDP2 did not shard"
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in trainer.model.named_parameters()}


def _train(out, world, engine, tie, precomputed, wrap):
    from wspo_kernels.train import WSPOTrainer, precompute_logps
    frozen = frozen_models()
    rows = examples(ROWS)
    args = _args(out, world, engine, wrap)
    if world > 1 and engine == "fsdp2":
        _fsdp_on_cpu()
    if precomputed:
        ds = precompute_logps(datasets.Dataset.from_list(rows), **frozen, progress=False)
        trainer = WSPOTrainer(tiny(0, tie=tie), args, train_dataset=ds)
    else:
        trainer = WSPOTrainer(tiny(0, tie=tie), args, train_dataset=datasets.Dataset.from_list(rows), **frozen)
    trainer.train()
    params = _full_parameters(trainer, engine)
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    return (logged["loss"], logged["wspo/delta_strong"], logged["wspo/delta_weak"]), params


def _worker(rank, world, port, out, engine, tie, precomputed, wrap):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    loss, params = _train(os.path.join(out, "sharded"), world, engine, tie, precomputed, wrap)
    if rank == 0:
        torch.save((loss, params), os.path.join(out, "sharded.pt"))
    # Tear the group down before the interpreter exits: a gloo group left to process exit can abort it
    # ("terminate called without an active exception").
    import gc
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


LAYERS = ("LlamaDecoderLayer",)
CASES = [
    pytest.param("fsdp2", False, True, LAYERS, id="fsdp2-precomputed"),       # the head in the root's unit
    pytest.param("fsdp2", True, False, LAYERS, id="fsdp2-tied-resident"),     # tied embeddings, frozen models resident
    pytest.param("fsdp2", False, True, LAYERS + ("Linear",), id="fsdp2-head-unit"),  # the head a shard, unsharded
    pytest.param("zero3", False, True, LAYERS, id="zero3-precomputed"),
    pytest.param("zero3", True, False, LAYERS, id="zero3-tied-resident"),
]


@pytest.mark.parametrize("engine, tie, precomputed, wrap", CASES)
def test_sharded_step_equals_one_process(tmp_path, engine, tie, precomputed, wrap):
    if engine == "fsdp2" and not HAS_FSDP2:
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")
    if engine == "zero3" and not HAS_DEEPSPEED:
        pytest.skip("DeepSpeed is not installed (pip install deepspeed)")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path), engine, tie, precomputed, wrap),
                                nprocs=2)
    loss, params = torch.load(tmp_path / "sharded.pt")
    want_loss, want = _train(str(tmp_path / "one"), 1, engine, tie, precomputed, wrap)
    start = dict(tiny(0, tie=tie).named_parameters())
    assert max((want[n] - start[n]).abs().max().item() for n in want) > 1e-4, "the step must move the weights"
    for got, want_value in zip(loss, want_loss):  # the loss, and metrics summed over the ranks
        assert math.isclose(got, want_value, rel_tol=1e-5, abs_tol=1e-9), (loss, want_loss)
    for name, p in want.items():
        torch.testing.assert_close(params[name], p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
