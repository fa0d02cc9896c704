"""Padding-free (packed) batches: the collator, the boundaries the models keep, and training that is the
same as with padded batches (WSPOTrainer, gradient accumulation, DDP; Llama, Qwen2, a tied head; resident
and precomputed frozen models; full and LoRA)."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, TrainingArguments  # noqa: E402

from wspo_kernels.train import WSPODataCollator, WSPOTrainer, precompute_logps  # noqa: E402
from wspo_kernels.train.config import ConfigError, parse_config  # noqa: E402
from wspo_kernels.train.model_io import PackingUnsupported, check_keeps_boundaries  # noqa: E402
from wspo_kernels.train.precompute import length_batches  # noqa: E402
from wspo_kernels.train.trainer import count_sequences  # noqa: E402
from train_fixtures import (VOCAB, examples, free_port, frozen_models, save_tiny_checkpoints, tiny,  # noqa: E402
                            write_config)

SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)


def model(kind, seed, attn="sdpa"):
    torch.manual_seed(seed)
    if kind == "qwen2":  # q/k/v projections with biases
        m = Qwen2ForCausalLM(Qwen2Config(**SMALL, attn_implementation=attn))
        for name, p in m.named_parameters():
            if name.endswith("proj.bias"):
                torch.nn.init.normal_(p, std=0.5)  # biases that matter
        return m
    return LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=kind == "tied", attn_implementation=attn))


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no")
    return TrainingArguments(**{**base, **kw})


# ------------------------------------------------------------------------------------------ the collator
def test_collator_packs_rows_with_restarting_positions():
    rows = [dict(input_ids=[5, 6, 7], labels=[-100, 6, 7], ref_logps=[-1.0, -2.0]),
            dict(input_ids=[8, 9], labels=[-100, 9], ref_logps=[-3.0])]
    padded = WSPODataCollator(0, pad_to_multiple_of=8)(rows)
    packed = WSPODataCollator(0, pad_to_multiple_of=8, padding_free=True)(rows)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and "attention_mask" not in packed
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert packed["cu_seqlens"].tolist() == [0, 3, 5] and packed["cu_seqlens"].dtype == torch.int64
    assert packed["ref_logps"].tolist() == [[-1.0, -2.0, 0.0, -3.0, 0.0]]  # 0 where a sequence has no target
    assert packed["max_seqlen"] == 3
    assert packed["grid_positions"] == padded["labels"][:, 1:].numel() == 2 * 7
    assert count_sequences(packed["labels"], packed["cu_seqlens"]) == count_sequences(padded["labels"]) == 2
    # a row whose only label is its first token has no target after the shift
    lone = WSPODataCollator(0, padding_free=True)([dict(input_ids=[4, 5], labels=[4, -100]), rows[1]])
    assert count_sequences(lone["labels"], lone["cu_seqlens"]) == 1


# ------------------------------------------------------------------------------------------ boundaries
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_sequences_never_attend_to_each_other(kind, attn):
    """On the CPU transformers builds a block-diagonal causal mask from the restarting position_ids: each
    sequence's hidden states are the ones it gets alone, and changing every token of its packed neighbours
    changes nothing in them (before this change the collator padded; packed rows without that mask leak)."""
    m = model(kind, 0, attn).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, VOCAB, (n,), generator=g) for n in (5, 3, 6)]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    with torch.no_grad():
        packed = m(input_ids=torch.cat(seqs)[None], position_ids=positions, use_cache=False).logits[0]
        alone = [m(input_ids=s[None]).logits[0] for s in seqs]
        torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)
        changed = [seqs[0], (seqs[1] % (VOCAB - 1)) + 1, seqs[2]]   # every token of the middle one differs
        assert all((a != b).all() for a, b in zip(changed[1], seqs[1]))
        other = m(input_ids=torch.cat(changed)[None], position_ids=positions, use_cache=False).logits[0]
    assert torch.equal(other[:5], packed[:5]) and torch.equal(other[8:], packed[8:])
    assert not torch.equal(other[5:8], packed[5:8])
    check_keeps_boundaries(m, "the policy")  # the trainer's probe passes


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_model_that_leaks_across_the_boundary_is_refused(tmp_path, attn):
    """A model that ignores where a sequence starts: the probe sees the leak (eager: transformers' plain
    causal mask over the whole row), or the packed attention's refusal (sdpa: no boundaries reach it)."""
    m = tiny(0, attn_implementation=attn)
    real_forward = m.forward

    def ignores_boundaries(*a, position_ids=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                           max_length_k=None, **kw):  # the plain causal mask over the whole packed row
        return real_forward(*a, **kw)
    m.forward = ignores_boundaries
    message = (r"the policy \(LlamaForCausalLM, attn_implementation=eager\) lets packed sequences see each other"
               if attn == "eager" else r"the policy \(LlamaForCausalLM\) cannot run a packed row \(ValueError: "
               r"wspo_varlen_sdpa runs packed rows only")
    with pytest.raises(PackingUnsupported, match=message + ".*padding_free: false"):
        WSPOTrainer(m, args(tmp_path), padding_free=True, **frozen_models())
    WSPOTrainer(m, args(tmp_path), **frozen_models())  # padded batches need no boundaries


# ------------------------------------------------------------------------------------------ same training
def _rows(frozen, precomputed, n=8):
    rows = examples(n, seed=3)
    if precomputed:
        rows = list(precompute_logps(datasets.Dataset.from_list(rows), **frozen, batch_size=4, progress=False))
    return rows


@pytest.mark.parametrize("kind", ["llama", "qwen2", "tied"])
@pytest.mark.parametrize("precomputed", [False, True], ids=["resident", "precomputed"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_training_equals_padded(tmp_path, kind, precomputed, lora):
    """Trainer.train(): micro-batches of 2, 2 accumulation steps, one SGD step: the same loss, per-sequence
    logps and weights (the step is lr x the gradient) padded or packed."""
    frozen = {k: model(kind, seed) for k, seed in zip(("ref_model", "weak_aligned_model", "weak_base_model"),
                                                       (1, 2, 3))}
    rows = _rows(frozen, precomputed)
    results = []
    for padding_free in (False, True):
        policy = model(kind, 0)
        if lora:
            peft = pytest.importorskip("peft")
            policy = peft.get_peft_model(policy, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(5))
        resident = {} if precomputed else {k: v for k, v in frozen.items() if not (lora and k == "ref_model")}
        trainer = WSPOTrainer(policy, args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                           max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                                           max_grad_norm=1e9, seed=0, logging_steps=1),
                              train_dataset=datasets.Dataset.from_list(rows), gamma=0.1, padding_free=padding_free,
                              **resident)
        batch = trainer.data_collator(rows[:4])
        loss, out = trainer.compute_loss(policy.train(), batch, return_outputs=True)
        logps = out["policy_logps"].detach()
        if padding_free:  # [N] -> the padded [B, T-1] grid, sequence by sequence
            cu = batch["cu_seqlens"].tolist()
            logps = [logps[a:b - 1] for a, b in zip(cu[:-1], cu[1:])]
        else:
            lengths = [len(r["input_ids"]) - 1 for r in rows[:4]]
            logps = [row[:n] for row, n in zip(logps, lengths)]
        trainer.train()
        weights = torch.cat([p.detach().reshape(-1) for p in policy.parameters() if p.requires_grad])
        history = [h for h in trainer.state.log_history if "loss" in h]
        results.append((loss.detach(), logps, weights, history[0]))
    (loss_a, logps_a, w_a, log_a), (loss_b, logps_b, w_b, log_b) = results
    assert math.isclose(loss_a.item(), loss_b.item(), rel_tol=1e-5)
    for a, b in zip(logps_a, logps_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    start = model(kind, 0)
    moved = (w_a - torch.cat([p.reshape(-1) for p in start.parameters()])).abs().max() if not lora else w_a.abs().max()
    assert (w_a - w_b).abs().max() <= 1e-4 * max(moved.item(), 1e-8), "the packed step moved the weights differently"
    for key in ("loss", "wspo/delta_strong", "wspo/delta_weak", "wspo/policy_logps", "logps/chosen", "rewards/chosen"):
        assert math.isclose(log_a[key], log_b[key], rel_tol=1e-4, abs_tol=1e-7), key


@pytest.mark.parametrize("reentrant", [False, True])
def test_packed_training_with_gradient_checkpointing(tmp_path, reentrant):
    """Checkpointed layers run their forward again in the backward: the packed attention must still be the
    per-sequence one there (else every sequence would see the ones before it in the recomputation)."""
    frozen = frozen_models()
    rows = _rows(frozen, True)
    weights = []
    for padding_free in (False, True):
        policy = model("llama", 0)
        trainer = WSPOTrainer(policy, args(tmp_path, per_device_train_batch_size=4, max_steps=1, learning_rate=0.5,
                                           optim="sgd", lr_scheduler_type="constant", max_grad_norm=1e9, seed=0,
                                           gradient_checkpointing=True,
                                           gradient_checkpointing_kwargs={"use_reentrant": reentrant}),
                              train_dataset=datasets.Dataset.from_list(rows), gamma=0.1, padding_free=padding_free)
        trainer.train()
        assert policy.config._attn_implementation == "sdpa"
        weights.append(torch.cat([p.detach().reshape(-1) for p in policy.parameters()]))
    start = torch.cat([p.reshape(-1) for p in model("llama", 0).parameters()])
    moved = (weights[0] - start).abs().max().item()
    assert moved > 1e-6 and (weights[0] - weights[1]).abs().max().item() <= 1e-4 * moved


def _ddp_worker(rank, world, path, rows, port):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    policy = model("qwen2", 0)
    trainer = WSPOTrainer(policy, TrainingArguments(output_dir=path + ".out", report_to=[], use_cpu=True,
                                                    save_strategy="no", per_device_train_batch_size=2,
                                                    gradient_accumulation_steps=2, max_steps=1, learning_rate=0.5,
                                                    optim="sgd", lr_scheduler_type="constant", max_grad_norm=1e9,
                                                    seed=0, ddp_backend="gloo"),
                          train_dataset=datasets.Dataset.from_list(rows), gamma=0.1, padding_free=True)
    trainer.train()
    if rank == 0:
        torch.save([p.detach() for p in policy.parameters()], path)
    dist.barrier()
    dist.destroy_process_group()


def test_packed_data_parallel_equals_padded_one_process(tmp_path):
    """Two gloo ranks on packed micro-batches, each normalising by the global sequence count: the same step
    as one process on padded batches of the whole data."""
    frozen = {k: model("qwen2", s) for k, s in zip(("ref_model", "weak_aligned_model", "weak_base_model"), (1, 2, 3))}
    rows = _rows(frozen, True)
    path = str(tmp_path / "weights.pt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, path, rows, free_port()), nprocs=2)
    policy = model("qwen2", 0)
    WSPOTrainer(policy, args(tmp_path, per_device_train_batch_size=8, max_steps=1, learning_rate=0.5, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=1e9, seed=0),
                train_dataset=datasets.Dataset.from_list(rows), gamma=0.1).train()
    for got, want in zip(torch.load(path), policy.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ precompute
def test_length_batches_sort_and_respect_the_budget():
    lengths = [5, 40, 7, 38, 6, 39, 3]
    batches = length_batches(lengths, batch_tokens=80, max_rows=8)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [1, 5] and all(len(b) * max(lengths[i] for i in b) <= 80 for b in batches)
    assert length_batches(lengths, batch_tokens=1000, max_rows=3) == [[1, 5, 3], [2, 4, 0], [6]]


def test_precompute_in_length_sorted_batches_writes_back_in_order(tmp_path):
    """Longest first in token-budget batches: the same logps as the dataset's order in fixed batches, row by
    row, and far less padding."""
    frozen = frozen_models()
    rows = examples(20, seed=4)
    ds = datasets.Dataset.from_list(rows)
    before = precompute_logps(ds, **frozen, batch_size=4, progress=False)
    after = precompute_logps(ds, **frozen, batch_size=8, batch_tokens=32, shard_size=16, progress=False)
    for column in ("ref_logps", "weak_aligned_logps", "weak_base_logps"):
        for a, b in zip(before[column], after[column]):
            torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    lengths = [len(r["input_ids"]) for r in rows]
    padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)  # noqa: E731
    in_order = [list(range(b, min(20, b + 4))) for b in range(0, 20, 4)]
    assert padded(length_batches(lengths, 32, 8)) < padded(in_order)


def test_a_token_budget_smaller_than_a_row_is_refused_before_any_model_runs(tmp_path):
    class Exploding(torch.nn.Module):
        def __getattr__(self, name):
            raise AssertionError("a model ran")
    ds = datasets.Dataset.from_list(examples(6))
    longest = max(len(r["input_ids"]) for r in examples(6))
    with pytest.raises(ValueError, match=rf"batch_tokens=3 is smaller than the longest row \({longest} tokens\)"):
        precompute_logps(ds, ref_model=Exploding(), batch_tokens=3, progress=False)
    with pytest.raises(ValueError, match="batch_tokens must be a positive number of tokens"):
        precompute_logps(ds, ref_model=Exploding(), batch_tokens=0, progress=False)


# ------------------------------------------------------------------------------------------ bad input
def test_padding_free_bad_input_is_refused_before_any_model_runs(tmp_path):
    frozen = frozen_models()
    by_length = (dict(train_sampling_strategy="group_by_length") if hasattr(TrainingArguments, "train_sampling_strategy")
                 else dict(group_by_length=True))  # transformers 5 / 4
    with pytest.raises(ValueError, match="padding_free: group_by_length"):
        WSPOTrainer(tiny(0), args(tmp_path, **by_length), padding_free=True, **frozen)
    with pytest.raises(ValueError, match=r"padding_free: the data_collator pads"):
        WSPOTrainer(tiny(0), args(tmp_path), padding_free=True, data_collator=WSPODataCollator(0), **frozen)
    trainer = WSPOTrainer(tiny(0), args(tmp_path), padding_free=True, **frozen)
    packed = WSPODataCollator(0, padding_free=True)(examples(3))
    with pytest.raises(ValueError, match="padding_free: a packed batch carries an attention_mask"):
        trainer.compute_loss(trainer.model, {**packed, "attention_mask": torch.ones_like(packed["input_ids"])})
    with pytest.raises(ValueError, match="padding_free: the batch is not packed"):
        trainer.compute_loss(trainer.model, WSPODataCollator(0)(examples(3)))
    padded = WSPOTrainer(tiny(0), args(tmp_path), **frozen)
    with pytest.raises(ValueError, match="a packed batch .* reached a WSPOTrainer built without padding_free=True"):
        padded.compute_loss(padded.model, packed)
    # a packing collator makes a padding-free trainer, probe included
    assert WSPOTrainer(tiny(0), args(tmp_path), data_collator=WSPODataCollator(0, padding_free=True),
                       **frozen).padding_free


def test_config_keys(tmp_path):
    paths, data = save_tiny_checkpoints(tmp_path)
    common = [f"model_name_or_path={paths['policy']}", f"weak_aligned_model={paths['weak_aligned']}",
              f"weak_base_model={paths['weak_base']}", f"dataset={data}", f"output_dir={tmp_path / 'o'}"]
    parse = lambda *extra: parse_config([*common, *extra])  # noqa: E731
    assert parse("padding_free=true").wspo.padding_free is True
    assert parse("neat_packing=true").wspo.padding_free is True     # LLaMA-Factory's name
    assert parse("packing=false").wspo.padding_free is False
    with pytest.raises(ConfigError, match="packing: true .* attend to each other.*padding_free: true"):
        parse("packing=true")
    by_length = ("train_sampling_strategy=group_by_length" if hasattr(TrainingArguments, "train_sampling_strategy")
                 else "group_by_length=true")
    with pytest.raises(ConfigError, match="padding_free and group_by_length"):
        parse("padding_free=true", by_length)
    with pytest.raises(ConfigError, match=r"precompute_batch_tokens must be >= 1"):
        parse("precompute_batch_tokens=0")


def test_a_precompute_budget_smaller_than_a_row_is_a_config_error(tmp_path, capsys):
    from wspo_kernels.__main__ import main as wspo_main
    paths, data = save_tiny_checkpoints(tmp_path)
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", "precompute_batch_tokens: 3")
    assert wspo_main(["train", config]) == 2
    err = capsys.readouterr().err
    assert "error: precompute_batch_tokens=3 is smaller than the longest row" in err and "Traceback" not in err


def test_the_cli_trains_the_same_packed(tmp_path, monkeypatch):
    """wspo-kernels train (precomputed frozen logps, micro-batches of 4, two SGD steps) with padding_free: true
    saves the weights it saves without."""
    from safetensors.torch import load_file
    from wspo_kernels.__main__ import main as wspo_main
    seen = []
    real = WSPOTrainer.compute_loss

    def spy(self, model, inputs, *a, **kw):
        seen.append(("cu_seqlens" in inputs, "attention_mask" in inputs))
        return real(self, model, inputs, *a, **kw)
    monkeypatch.setattr(WSPOTrainer, "compute_loss", spy)
    paths, data = save_tiny_checkpoints(tmp_path)
    weights = {}
    for packed in (False, True):
        seen.clear()
        out = tmp_path / f"out-{packed}"
        config = write_config(tmp_path / f"c-{packed}.yaml", paths, data, out, "optim: sgd", "learning_rate: 0.5",
                              "lr_scheduler_type: constant", "warmup_steps: 0", "max_grad_norm: 1.0e9",
                              f"padding_free: {str(packed).lower()}")
        assert wspo_main(["train", config]) == 0
        assert seen and all(s == (packed, not packed) for s in seen), seen  # packed batches reached the loss
        weights[packed] = load_file(str(out / "model.safetensors"))
    start = tiny(0).state_dict()
    assert max((a - start[n]).abs().max().item() for n, a in weights[False].items() if n in start) > 1e-6
    for name, a in weights[False].items():
        moved = (a - start[name]).abs().max().item() if name in start else a.abs().max().item()
        assert (a - weights[True][name]).abs().max().item() <= 1e-4 * max(moved, 1e-8), name


def test_the_benchmark_script_runs(tmp_path):
    """benchmarks/padding_free.py end to end on a few short rows (its numbers mean nothing at this size)."""
    import runpy
    import os
    script = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "padding_free.py"))
    out = tmp_path / "t.md"
    script["main"](["--rows", "8", "--steps", "2", "--repeats", "1", "--cutoff", "64", "--out", str(out)])
    table = out.read_text()
    assert "| padding_free (packed) |" in table and "% of the floor" in table and "| floor: each row alone" in table


def test_sliding_window_attention_packed(tmp_path):
    """Mistral-style sliding-window attention (a window of 3 over sequences of up to 7 tokens) keeps its band
    in the packed sdpa path: each packed sequence's hidden states are the ones it gets alone."""
    from transformers import MistralConfig, MistralForCausalLM
    from wspo_kernels.train.model_io import lm_head_inputs, packed_kwargs
    torch.manual_seed(0)
    m = MistralForCausalLM(MistralConfig(**SMALL, sliding_window=3, attn_implementation="sdpa")).eval()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, VOCAB, (n,), generator=g) for n in (7, 2, 5)]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    cu = torch.tensor([0, 7, 9, 14])
    with torch.no_grad():
        packed = lm_head_inputs(m, torch.cat(seqs)[None], longest=7, **packed_kwargs(m, positions, cu, 7))[0][0]
        alone = torch.cat([lm_head_inputs(m, s[None])[0][0] for s in seqs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert m.config._attn_implementation == "sdpa"  # the packed forward's swap is undone
