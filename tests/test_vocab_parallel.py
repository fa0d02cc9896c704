"""vocab_group=: the vocabulary sharded over 2 and 3 gloo ranks (uneven shards) against one process.

Every rank builds the same full inputs, runs the single-process call on them and the vocab-parallel call
on its shard: the loss and logps must agree, the gradients of sharded inputs (logits, lm_head weight and
bias) must be the slices of the single-process gradients, and the gradient of the replicated hidden
states the whole single-process one.  A failure on any rank fails the test with that rank's message.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist

import wspo_kernels as wk
from helpers import BACKENDS, assert_close, check_grad, check_loss, make_labels, make_logits

V_STRONG, V_WEAK, H = 37, 31, 8     # the weak models' vocabulary differs and is sharded differently
B, T = 3, 7


def _close(got, want, dtype, what):
    """fp32: DESIGN.md's 1e-5 * max|grad|; bf16: one bf16 ulp at the largest magnitude (the shard's kernel
    runs with statistics combined in another order, which may flip a rounding)."""
    if dtype == torch.float32:
        assert_close(got.float(), want.float(), atol=2.0 ** -7 * want.float().abs().max().item(), what=what)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


def _sizes(vocab, world):
    """Uneven contiguous shards: the first ranks hold one column more."""
    return [vocab // world + (r < vocab % world) for r in range(world)]


def _mine(x, sizes, rank, dim=-1):
    return x.split(sizes, dim=dim)[rank]


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    labels = make_labels((B, T), V_WEAK, generator=g, ignore_rows=(1,))
    labels[0, :2] = -100
    logits = {name: make_logits((B, T, V_STRONG if name in ("policy", "ref") else V_WEAK), dtype, generator=g)
              for name in ("policy", "ref", "aligned", "base")}
    logits["policy"][2, 3] += 40.0  # a confident token (p_y -> 1): the label term must stay out of R
    hidden = {name: torch.randn(B, T, H, generator=g).to(dtype) for name in ("policy", "ref", "aligned", "base")}
    heads = {name: (torch.randn(V_STRONG if name in ("policy", "ref") else V_WEAK, H, generator=g).to(dtype),
                    torch.randn(V_STRONG if name in ("policy", "ref") else V_WEAK, generator=g).to(dtype))
             for name in ("policy", "ref", "aligned", "base")}
    return labels, logits, hidden, heads


def _logits_cases(rank, world, backend, dtype, group):
    labels, logits, _, _ = _inputs(dtype)
    s_strong, s_weak = _sizes(V_STRONG, world), _sizes(V_WEAK, world)
    shard = {n: _mine(x, s_strong if n in ("policy", "ref") else s_weak, rank) for n, x in logits.items()}
    # token_logprobs / weak_log_ratio values and the logprobs gradient.
    full = logits["policy"].clone().requires_grad_()
    mine = shard["policy"].clone().requires_grad_()
    want = wk.token_logprobs(full, labels, shift=True, backend=backend)
    got = wk.token_logprobs(mine, labels, shift=True, vocab_group=group, backend=backend)
    check_loss(got, want, dtype, "token_logprobs")
    weights = torch.linspace(-1, 1, want.numel()).reshape(want.shape)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    _close(mine.grad, _mine(full.grad, s_strong, rank), dtype, "logprobs grad")
    check_loss(wk.weak_log_ratio(shard["aligned"], shard["base"], labels, shift=True, vocab_group=group,
                                 backend=backend),
               wk.weak_log_ratio(logits["aligned"], logits["base"], labels, shift=True, backend=backend), dtype,
               "weak_log_ratio")
    # wspo_loss: frozen models as logits shards, then as precomputed (replicated) logps.
    logps = {n: wk.token_logprobs(logits[n], labels, shift=True) for n in ("ref", "aligned", "base")}
    for frozen in ("logits", "logps"):
        src_full = logits if frozen == "logits" else logps
        src_mine = shard if frozen == "logits" else logps
        for reduction in ("mean", "sum", "none"):
            full = logits["policy"].clone().requires_grad_()
            mine = shard["policy"].clone().requires_grad_()
            kw = dict(gamma=0.3, reduction=reduction, backend=backend)
            want = wk.wspo_loss(full, labels, ref=src_full["ref"], weak_aligned=src_full["aligned"],
                                weak_base=src_full["base"], **kw)
            got = wk.wspo_loss(mine, labels, ref=src_mine["ref"], weak_aligned=src_mine["aligned"],
                               weak_base=src_mine["base"], vocab_group=group, **kw)
            what = f"wspo_loss {frozen} {reduction}"
            check_loss(got, want, dtype, what)
            up = torch.linspace(0.5, 2, want.numel()).reshape(want.shape)
            (want * up).sum().backward()
            (got * up).sum().backward()
            expected = _mine(full.grad, s_strong, rank)
            _close(mine.grad, expected, dtype, what + " grad")


def _edge_cases(rank, world, backend, dtype, group):
    """A non-negative ignore_index (a pad id); a row whose every logit on one shard is -inf."""
    labels, logits, _, _ = _inputs(dtype)
    sizes = _sizes(V_STRONG, world)
    x = logits["policy"].clone()
    x[0, 3, : sizes[0]] = float("-inf")            # rank 0's part of the row: all -inf
    labels = labels.clone()
    labels[0, 4] = sizes[0] + 1                     # its label lives on rank 1
    labels[1, 2] = 3                                # ignored when the pad id 3 is the ignore_index
    for ignore_index in (-100, 3):
        labels = labels.masked_fill(labels == -100, ignore_index)
        full = x.clone().requires_grad_()
        mine = _mine(x, sizes, rank).clone().requires_grad_()
        want = wk.token_logprobs(full, labels, shift=True, ignore_index=ignore_index, backend=backend)
        got = wk.token_logprobs(mine, labels, shift=True, ignore_index=ignore_index, vocab_group=group,
                                backend=backend)
        check_loss(got, want, dtype, f"token_logprobs ignore_index={ignore_index}")
        want.sum().backward()
        got.sum().backward()
        assert torch.isfinite(mine.grad).all()
        _close(mine.grad, _mine(full.grad, sizes, rank), dtype, f"logprobs grad ignore_index={ignore_index}")


def _linear_cases(rank, world, backend, dtype, group):
    labels, _, hidden, heads = _inputs(dtype)
    s_strong, s_weak = _sizes(V_STRONG, world), _sizes(V_WEAK, world)
    shard = {n: tuple(_mine(t, s_strong if n in ("policy", "ref") else s_weak, rank, dim=0) for t in wb)
             for n, wb in heads.items()}
    for reduction in ("mean", "sum", "none"):
        leaves_full = [hidden["policy"].clone().requires_grad_(), heads["policy"][0].clone().requires_grad_(),
                       heads["policy"][1].clone().requires_grad_()]
        leaves_mine = [hidden["policy"].clone().requires_grad_(), shard["policy"][0].clone().requires_grad_(),
                       shard["policy"][1].clone().requires_grad_()]
        frozen_full = {n: (hidden[n], *heads[n]) for n in ("ref", "aligned", "base")}
        frozen_mine = {n: (hidden[n], *shard[n]) for n in ("ref", "aligned", "base")}
        kw = dict(gamma=0.2, reduction=reduction, backend=backend)
        want = wk.linear_wspo_loss(leaves_full[0], leaves_full[1], labels, bias=leaves_full[2], ref=frozen_full["ref"],
                                   weak_aligned=frozen_full["aligned"], weak_base=frozen_full["base"], **kw)
        got = wk.linear_wspo_loss(leaves_mine[0], leaves_mine[1], labels, bias=leaves_mine[2], ref=frozen_mine["ref"],
                                  weak_aligned=frozen_mine["aligned"], weak_base=frozen_mine["base"],
                                  vocab_group=group, **kw)
        what = f"linear_wspo_loss {reduction}"
        check_loss(got, want, dtype, what)
        up = torch.linspace(0.5, 2, want.numel()).reshape(want.shape)
        (want * up).sum().backward()
        (got * up).sum().backward()
        _close(leaves_mine[0].grad, leaves_full[0].grad, dtype, what + " d hidden (all ranks)")
        for i, name in ((1, "d weight"), (2, "d bias")):
            expected = _mine(leaves_full[i].grad, s_strong, rank, dim=0)
            _close(leaves_mine[i].grad, expected, dtype, f"{what} {name} shard")
    # reduce_hidden_grad=False: this rank's share; the group's sum is the whole gradient.
    h = hidden["policy"].clone().requires_grad_()
    wk.linear_token_logprobs(h, shard["policy"][0], labels, bias=shard["policy"][1], shift=True, vocab_group=group,
                             reduce_hidden_grad=False, backend=backend).sum().backward()
    share = h.grad.clone()
    dist.all_reduce(share, group=group)
    h_full = hidden["policy"].clone().requires_grad_()
    wk.linear_token_logprobs(h_full, heads["policy"][0], labels, bias=heads["policy"][1], shift=True,
                             backend=backend).sum().backward()
    _close(share, h_full.grad, dtype, "d hidden summed by the caller")


def _worker(rank, world, port, backends):
    _init(rank, world, port)
    try:
        group = dist.new_group(list(range(world)))
        for backend in backends:
            for dtype in (torch.float32,) if backend == "triton" else (torch.float32, torch.bfloat16):
                _logits_cases(rank, world, backend, dtype, group)
                _edge_cases(rank, world, backend, dtype, group)
                _linear_cases(rank, world, backend, dtype, group)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_equals_one_process(world):
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), BACKENDS), nprocs=world)


def _error_worker(rank, world, port):
    _init(rank, world, port)
    try:
        labels, logits, _, _ = _inputs(torch.float32)
        sizes = _sizes(V_STRONG, world)
        mine = _mine(logits["policy"], sizes, rank)
        outside, differ = labels.clone(), labels.clone()
        outside[0, 4] = V_STRONG  # the shards add up to 37 columns
        differ[0, 4] = 1 if rank else 2
        cases = [
            ("labels outside the global vocabulary", lambda: wk.token_logprobs(
                mine, outside, vocab_group=dist.group.WORLD),
             "labels must be in \\[0, 37\\) for logits \\(sharded over vocab_group"),
            ("shards of different dtypes", lambda: wk.token_logprobs(
                mine.to(torch.bfloat16) if rank else mine, labels, vocab_group=dist.group.WORLD),
             "different dtypes across ranks"),
            ("labels that differ between ranks", lambda: wk.token_logprobs(
                mine, differ, vocab_group=dist.group.WORLD),
             "labels differ between the ranks"),
            ("a shape error on one rank", lambda: wk.token_logprobs(
                mine[:, 1:] if rank else mine, labels, vocab_group=dist.group.WORLD),
             "must have shape" if rank else "rank\\(s\\) \\[1\\] of vocab_group rejected their inputs"),
            ("inplace_grad", lambda: wk.wspo_loss(mine.requires_grad_(), labels, ref=mine, weak_aligned=mine,
                                                  weak_base=mine, inplace_grad=True, vocab_group=dist.group.WORLD),
             "inplace_grad=True is not supported with vocab_group"),
        ]
        for what, call, message in cases:
            with pytest.raises(ValueError, match=message):
                call()
                pytest.fail(f"rank {rank}: {what}: no error")
            dist.barrier()  # every rank raised: nobody is left waiting in a collective
        # create_graph=True is refused on every rank before any collective of the backward
        leaf = mine.clone().requires_grad_()
        h, w = torch.randn(*labels.shape, 3).requires_grad_(), torch.randn(mine.shape[-1], 3).requires_grad_()
        for what, out, leaves in (
                ("token_logprobs", lambda: wk.token_logprobs(leaf, labels, vocab_group=dist.group.WORLD), [leaf]),
                ("linear_token_logprobs", lambda: wk.linear_token_logprobs(
                    h, w, labels, vocab_group=dist.group.WORLD), [h, w])):
            with pytest.raises(RuntimeError, match="create_graph=True"):
                torch.autograd.grad(out().sum(), leaves, create_graph=True)
                pytest.fail(f"rank {rank}: {what}: create_graph=True accepted")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_bad_vocab_parallel_input_fails_on_every_rank():
    torch.multiprocessing.spawn(_error_worker, args=(2, _free_port()), nprocs=2)


def test_vocab_group_needs_torch_distributed():
    with pytest.raises(ValueError, match="vocab_group needs torch.distributed to be initialised"):
        wk.token_logprobs(torch.randn(2, 5), torch.tensor([1, 2]), vocab_group=object())


def _trainer_worker(rank, world, port, out):
    """A policy whose lm_head is a vocabulary shard (a ColumnParallelLinear-style head), in WSPOTrainer."""
    _init(rank, world, port)
    try:
        from transformers import TrainingArguments
        from train_fixtures import VOCAB, examples, frozen_models, tiny
        from wspo_kernels.train import WSPODataCollator, WSPOTrainer, precompute_logps
        import datasets
        rows = list(precompute_logps(datasets.Dataset.from_list(examples(6)), **frozen_models(), progress=False))
        batch = WSPODataCollator(0)(rows)
        args = TrainingArguments(output_dir=out, report_to=[], use_cpu=True)
        full = tiny(0)
        want = WSPOTrainer(full, args).compute_loss(full.train(), batch)
        want.backward()
        sizes = _sizes(VOCAB, world)
        policy = tiny(0)
        shard = _mine(policy.lm_head.weight.detach(), sizes, rank, dim=0).clone()
        policy.lm_head = torch.nn.Linear(shard.shape[1], shard.shape[0], bias=False)
        policy.lm_head.weight.data.copy_(shard)
        got = WSPOTrainer(policy, args, vocab_group=dist.group.WORLD).compute_loss(policy.train(), batch)
        got.backward()
        check_loss(got, want, torch.float32, "trainer loss")
        expected = _mine(full.lm_head.weight.grad, sizes, rank, dim=0)
        check_grad(policy.lm_head.weight.grad, expected, torch.float32, what="lm_head shard grad")
        check_grad(policy.model.norm.weight.grad, full.model.norm.weight.grad, torch.float32, what="norm grad")
    finally:
        dist.destroy_process_group()


def test_trainer_with_a_vocab_sharded_head(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    torch.multiprocessing.spawn(_trainer_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
