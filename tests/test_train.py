"""WSPOTrainer, precompute and the demo on tiny random Llama models, against the official formulation."""
import json
import math
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import TrainingArguments  # noqa: E402

from wspo_kernels.reference import reference_wspo_loss  # noqa: E402
from wspo_kernels.train import WSPODataCollator, WSPOTrainer, precompute_logps  # noqa: E402
from wspo_kernels.train import precompute as precompute_mod  # noqa: E402
from wspo_kernels.train.data import LOGPS_COLUMNS, build_example  # noqa: E402
from train_fixtures import VOCAB, examples, frozen_models, save_tiny_checkpoints, tiny  # noqa: E402
from wspo_kernels.train.trainer import count_sequences  # noqa: E402

def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no")
    return TrainingArguments(**{**base, **kw})


def official_loss(policy, frozen, batch, gamma=0.1):
    """The official formulation from every model's full logits, in float64."""
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = policy(**kw).logits.double()
    with torch.no_grad():
        ref, al, ba = (m(**kw).logits.double() for m in frozen)
    return reference_wspo_loss(logits, batch["labels"], ref=ref, weak_aligned=al, weak_base=ba, gamma=gamma)


def assert_grads_close(got, want):
    for (name, a), b in zip(got, want):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-4 * max(scale, 1e-8), f"{name}: gradient differs"


@pytest.mark.parametrize("precomputed", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_trainer_matches_official_formulation(tmp_path, precomputed, tie):
    policy, frozen = tiny(0, tie=tie), frozen_models()
    rows = examples(6)
    if precomputed:
        rows = list(precompute_logps(datasets.Dataset.from_list(rows), **frozen, batch_size=4, progress=False))
        trainer = WSPOTrainer(policy, args(tmp_path), gamma=0.1)
    else:
        trainer = WSPOTrainer(policy, args(tmp_path), gamma=0.1, **frozen)
    batch = WSPODataCollator(0)(rows)
    loss = trainer.compute_loss(policy.train(), batch)
    named = [(n, p) for n, p in policy.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    want = official_loss(policy, list(frozen.values()), batch)
    want_grads = torch.autograd.grad(want, [p for _, p in named])
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-5)
    assert_grads_close(zip([n for n, _ in named], grads), want_grads)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    rows = list(precompute_logps(datasets.Dataset.from_list(examples(4)), **frozen_models(), progress=False))
    ds = datasets.Dataset.from_list(rows)
    finals = []
    for bs, ga in ((4, 1), (1, 4), (2, 2)):
        policy = tiny(0)
        trainer = WSPOTrainer(policy, args(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                                           max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                                           max_grad_norm=1e9, seed=0), train_dataset=ds, gamma=0.1)
        trainer.train()
        finals.append(torch.cat([p.detach().reshape(-1) for p in policy.parameters()]))
    start = torch.cat([p.detach().reshape(-1) for p in tiny(0).parameters()])
    assert (finals[0] - start).abs().max() > 1e-6, "the step must move the weights"
    for other in finals[1:]:
        torch.testing.assert_close(other, finals[0], rtol=1e-5, atol=1e-7)


def test_lora_policy_reference_is_adapters_disabled(tmp_path):
    peft = pytest.importorskip("peft")
    policy = peft.get_peft_model(tiny(0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in policy.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)  # adapters that actually change the model
    frozen = frozen_models()
    trainer = WSPOTrainer(policy, args(tmp_path), gamma=0.3, weak_aligned_model=frozen["weak_aligned_model"],
                          weak_base_model=frozen["weak_base_model"])
    batch = WSPODataCollator(0)(examples(5, seed=2))
    loss = trainer.compute_loss(policy.train(), batch)
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named])
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad(), policy.disable_adapter():
        ref_logits = policy(**kw).logits.double()
    with torch.no_grad():
        al, ba = (frozen[k](**kw).logits.double() for k in ("weak_aligned_model", "weak_base_model"))
    want = reference_wspo_loss(policy(**kw).logits.double(), batch["labels"], ref=ref_logits, weak_aligned=al,
                               weak_base=ba, gamma=0.3)
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-5)
    assert_grads_close(zip([n for n, _ in named], grads), torch.autograd.grad(want, [p for _, p in named]))


def test_refuses_soft_capped_heads(tmp_path):
    policy = tiny(0)
    policy.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="soft-caps its logits"):
        WSPOTrainer(policy, args(tmp_path))


def test_missing_frozen_model_is_a_clear_error(tmp_path):
    trainer = WSPOTrainer(tiny(0), args(tmp_path), weak_aligned_model=tiny(2), weak_base_model=tiny(3))
    with pytest.raises(ValueError, match="needs the ref model or a precomputed 'ref_logps' column"):
        trainer.compute_loss(trainer.model.train(), WSPODataCollator(0)(examples(2)))


def test_precompute_round_trip_and_resume(tmp_path, monkeypatch):
    ds = datasets.Dataset.from_list(examples(10))
    frozen = frozen_models()
    out_dir = tmp_path / "pre"
    first = precompute_logps(ds, **frozen, batch_size=3, shard_size=4, output_dir=str(out_dir), progress=False)
    loaded = datasets.load_from_disk(str(out_dir / "dataset"))
    for c in LOGPS_COLUMNS.values():
        assert loaded[c] == first[c] and loaded.features[c].feature.dtype == "float32"
    # Values: the model's own log_softmax at the label, per position of labels[1:].
    row = first[7]
    ids = torch.tensor([row["input_ids"]])
    logp = torch.log_softmax(frozen["ref_model"](input_ids=ids).logits[0, :-1].double(), -1)
    labels = torch.tensor(row["labels"][1:])
    want = torch.where(labels != -100, logp.gather(-1, labels.clamp_min(0)[:, None])[:, 0], torch.zeros(()))
    torch.testing.assert_close(torch.tensor(row["ref_logps"], dtype=torch.float64), want, rtol=1e-5, atol=1e-5)
    # A complete cache is reused as it is; an interrupted run resumes at its first missing shard.
    calls = []
    real = precompute_mod._shard_logps

    def interrupted(*a):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a)
    monkeypatch.setattr(precompute_mod, "_shard_logps", interrupted)
    assert precompute_logps(ds, **frozen, batch_size=3, shard_size=4, output_dir=str(out_dir), progress=False)[
        "ref_logps"] == first["ref_logps"] and not calls
    with pytest.raises(KeyboardInterrupt):  # shard 0: 2 batches, shard 1: 1 of 2 batches, then stopped
        precompute_logps(ds, **frozen, batch_size=3, shard_size=4, output_dir=str(out_dir), progress=False,
                         resume=False)
    calls.clear()
    monkeypatch.setattr(precompute_mod, "_shard_logps", lambda *a: calls.append(1) or real(*a))
    second = precompute_logps(ds, **frozen, batch_size=3, shard_size=4, output_dir=str(out_dir), progress=False)
    assert len(calls) == 3  # shards 1 (2 batches) and 2 (1 batch); shard 0 was kept
    for c in LOGPS_COLUMNS.values():
        assert second[c] == first[c]
    assert not os.path.exists(out_dir / "shards")  # the complete dataset holds them


def test_rows_without_response_tokens_never_break_a_step(tmp_path):
    """Such rows pass the collator as all-ignored rows (left out of the mean), precompute gives them zero logps,
    and a micro-batch made only of them trains (batch 1 x accumulation 7, the official batch shape)."""
    collate = WSPODataCollator(0, max_length=4)
    rows = [build_example([5, 6, 7, 8, 9], [10, 11]), build_example([5], [10, 11])]
    batch = collate(rows)
    assert collate.truncated == 1 and batch["input_ids"].shape == (2, 4) and count_sequences(batch["labels"]) == 1
    empty = {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}
    ds = precompute_logps(datasets.Dataset.from_list(examples(6) + [empty]), **frozen_models(), progress=False)
    assert ds[6]["ref_logps"] == [0.0, 0.0]
    trainer = WSPOTrainer(tiny(0), args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=7,
                                        max_steps=1), train_dataset=ds)
    trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_dropout_is_disabled_in_policy_and_frozen_models(tmp_path):
    """As the official trainer: two evaluations of one batch in train mode give one loss (attention dropout 0.1)."""
    policy = tiny(0, attention_dropout=0.1)
    frozen = {k: tiny(i + 1, attention_dropout=0.1) for i, k in enumerate(frozen_models())}
    trainer = WSPOTrainer(policy, args(tmp_path), **frozen)
    batch = WSPODataCollator(0)(examples(6))
    first, second = (trainer.compute_loss(policy.train(), batch).item() for _ in range(2))
    assert first == second == trainer.compute_loss(policy.eval(), batch).item()


def test_default_args_keep_the_logps_columns_and_normaliser_resets(tmp_path, monkeypatch):
    """WSPOTrainer(args=None) trains on precomputed columns; after train(), compute_loss normalises by its batch."""
    monkeypatch.chdir(tmp_path)  # Trainer's default output_dir
    ds = precompute_logps(datasets.Dataset.from_list(examples(6)), **frozen_models(), progress=False)
    policy = tiny(0)
    trainer = WSPOTrainer(policy, train_dataset=ds)
    trainer.train()
    batch = WSPODataCollator(0)(list(ds.select(range(3))))
    got = trainer.compute_loss(policy.train(), batch)
    want = trainer.compute_loss(policy.eval(), batch)  # evaluation: the mean over this batch
    assert math.isclose(got.item(), want.item(), rel_tol=1e-6)


def test_logs_the_official_metric_names(tmp_path):
    """rewards/chosen = gamma * logps/chosen, the mean of the policy's per-token logps over the padded [B, T-1]
    grid, as the official trainer computes them."""
    policy, frozen = tiny(0), frozen_models()
    trainer = WSPOTrainer(policy, args(tmp_path), gamma=0.3, **frozen)
    batch = WSPODataCollator(0, pad_to_multiple_of=8)(examples(5))
    trainer.compute_loss(policy.train(), batch)
    logs = {}
    trainer.log(logs)
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * mask
    assert math.isclose(logs["logps/chosen"], logps.mean().item(), rel_tol=1e-5)
    assert math.isclose(logs["rewards/chosen"], 0.3 * logps.mean().item(), rel_tol=1e-5)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, path, rows, port):
    import datetime

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    from wspo_kernels import linear_wspo_loss
    from wspo_kernels.train import lm_head_inputs
    policy = torch.nn.parallel.DistributedDataParallel(tiny(0))
    mine = WSPODataCollator(0)(rows[rank::world])
    n_global = count_sequences(WSPODataCollator(0)(rows)["labels"])
    hidden, weight, bias = lm_head_inputs(policy, mine["input_ids"], mine["attention_mask"])
    loss = linear_wspo_loss(hidden, weight, mine["labels"], ref=mine["ref_logps"], weak_aligned=mine["weak_aligned_logps"],
                            weak_base=mine["weak_base_logps"], normalizer=n_global / world)
    loss.backward()
    if rank == 0:
        torch.save([p.grad for p in policy.module.parameters()], path)
    # Tear down in order: the DDP reducer before its process group (a reducer destroyed after the
    # group, at frame exit, can hang).
    del loss, hidden, weight, bias, policy
    dist.barrier()
    dist.destroy_process_group()


def test_data_parallel_gradients_equal_one_process(tmp_path):
    """Two gloo ranks, each normalising by the global sequence count / world size: DDP's average = one big batch."""
    rows = list(precompute_logps(datasets.Dataset.from_list(examples(6)), **frozen_models(), progress=False))
    path = str(tmp_path / "grads.pt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, path, rows, _free_port()), nprocs=2)
    policy = tiny(0)
    trainer = WSPOTrainer(policy, args(tmp_path))
    trainer.compute_loss(policy.train(), WSPODataCollator(0)(rows)).backward()
    for got, want in zip(torch.load(path), [p.grad for p in policy.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_demo_runs_end_to_end(tmp_path):
    from wspo_kernels.train import demo
    result = demo.run(quick=True, out_dir=str(tmp_path / "demo"), log=lambda *_: None)
    names = [r[0] for r in result["rows"]]
    assert names == ["weak base", "weak aligned", "strong base", "strong after WSPO"]
    assert all(math.isfinite(m) for _, m, _ in result["rows"])
    report = result["report"]  # the table is wspo-kernels eval's: one policy per gamma of the sweep
    assert [t["gamma"] for t in report["transfer"].values()] == [0.25, 1.0]
    from wspo_kernels.__main__ import main as wspo_main  # and the CLI on the models the demo saved: the same report
    assert wspo_main(["eval", result["eval_config"]]) == 0
    with open(tmp_path / "demo" / "wspo-gamma-0.25" / "wspo_eval.json") as f:
        cli_report = json.load(f)
    for demo_name, cli_name in (("weak base", "weak base"), ("weak aligned", "weak aligned"),
                                ("strong base", "strong reference"), ("strong after WSPO (gamma 0.25)", "policy"),
                                ("strong after WSPO (gamma 1)", "policy wspo-gamma-1")):
        assert math.isclose(report["models"][demo_name]["margin"], cli_report["models"][cli_name]["margin"],
                            abs_tol=1e-4), demo_name
    assert cli_report["transfer"]["policy wspo-gamma-1"]["gamma"] == 1.0
    assert os.path.exists(tmp_path / "demo" / "wspo_loss.png")
    assert result["losses"][-1][1] < result["losses"][0][1]


def test_rows_longer_than_the_context_are_refused(tmp_path):
    trainer = WSPOTrainer(tiny(0), args(tmp_path), **frozen_models())  # 64 positions
    batch = WSPODataCollator(0)([build_example(list(range(1, 40)), list(range(1, 40)))])
    with pytest.raises(ValueError, match="takes 64 positions, the batch has 78"):
        trainer.compute_loss(trainer.model.train(), batch)
