"""WSPOTrainer under FSDP2 (accelerate's fully_shard, as `fsdp` / `fsdp_config: {fsdp_version: 2}` exposes it)
on 2 gloo CPU processes against one process on the union batch: the same step loss and the same parameters
after one optimizer step, with precomputed logps and with resident frozen models, tied and untied heads,
gradient accumulation 2."""
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
fully_shard = pytest.importorskip("torch.distributed.fsdp").__dict__.get("fully_shard")
if fully_shard is None:
    pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6", allow_module_level=True)

from train_fixtures import examples, frozen_models, tiny  # noqa: E402

ROWS = 8  # one optimizer step: 2 ranks x 2 rows x accumulation 2 = 1 process x 8 rows


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(out, world, wrap=("LlamaDecoderLayer",), **kw):
    from transformers import TrainingArguments
    base = dict(output_dir=out, report_to=[], use_cpu=True, save_strategy="no", max_steps=1, learning_rate=0.5,
                optim="sgd", lr_scheduler_type="constant", max_grad_norm=1e9, seed=0, logging_steps=1,
                per_device_train_batch_size=ROWS // (2 * world), gradient_accumulation_steps=2)
    if world > 1:
        base.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                                    "transformer_layer_cls_to_wrap": list(wrap)})
    return TrainingArguments(**{**base, **kw})


def _fsdp_on_cpu():
    """accelerate takes its FSDP path only for accelerator device types and falls back to DDP for CPU
    processes; marking the (gloo, CPU) group as a GPU-type one makes it run its FSDP2 preparation
    (fully_shard per decoder layer and the root) on CPU tensors, which FSDP2 itself supports."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    PartialState()._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def _train(out, world, tie, precomputed, wrap=("LlamaDecoderLayer",)):
    from wspo_kernels.train import WSPOTrainer, precompute_logps
    frozen = frozen_models()
    rows = examples(ROWS)
    args = _args(out, world, wrap)
    if world > 1:
        _fsdp_on_cpu()
    if precomputed:
        ds = precompute_logps(datasets.Dataset.from_list(rows), **frozen, progress=False)
        trainer = WSPOTrainer(tiny(0, tie=tie), args, train_dataset=ds)
    else:
        trainer = WSPOTrainer(tiny(0, tie=tie), args, train_dataset=datasets.Dataset.from_list(rows), **frozen)
    trainer.train()
    from torch.distributed.tensor import DTensor
    assert world == 1 or all(isinstance(p, DTensor) for p in trainer.model.parameters()), "FSDP2 did not shard"
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in trainer.model.named_parameters()}
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return loss, params


def _worker(rank, world, port, out, tie, precomputed, wrap):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    loss, params = _train(os.path.join(out, "fsdp"), world, tie, precomputed, wrap)
    if rank == 0:
        torch.save((loss, params), os.path.join(out, "fsdp.pt"))


@pytest.mark.parametrize("tie, precomputed, wrap", [
    (False, True, ("LlamaDecoderLayer",)),            # the head in the root's unit: full after the forward
    (True, False, ("LlamaDecoderLayer",)),            # tied embeddings, frozen models resident
    (False, True, ("LlamaDecoderLayer", "Linear")),   # the head in a unit of its own: a shard, unsharded for the loss
])
def test_fsdp2_step_equals_one_process(tmp_path, tie, precomputed, wrap):
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path), tie, precomputed, wrap), nprocs=2)
    loss, params = torch.load(tmp_path / "fsdp.pt")
    want_loss, want = _train(str(tmp_path / "one"), 1, tie, precomputed)
    start = dict(tiny(0, tie=tie).named_parameters())
    assert max((want[n] - start[n]).abs().max().item() for n in want) > 1e-4, "the step must move the weights"
    assert math.isclose(loss, want_loss, rel_tol=1e-5), (loss, want_loss)
    for name, p in want.items():
        torch.testing.assert_close(params[name], p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
