"""Communication of the vocab-parallel label log-probs vs all-gathering the logits, per token.

    python benchmarks/vocab_parallel_comm.py [--tokens 2048] [--vocab 32000 152064] [--world 2]

Each rank holds a [N, V / world] fp32 shard of the logits (a tensor-parallel lm_head's output).
- ours: ``token_logprobs(shard, labels, vocab_group=...)`` forward + backward: a handshake all-gather
  (4 int64 per rank per call), an all-reduce MAX of one fp32 per token and an all-reduce SUM of two;
  the backward needs no communication (each rank writes its shard's gradient).
- gather: all-gather the shards into the full [N, V] logits on every rank, then ``token_logprobs`` on them.
Bytes are counted at the collectives (the payload each rank contributes and the bytes a ring algorithm
moves per rank: all-reduce 2 (w-1)/w, all-gather (w-1)/w of the full tensor) and computed from the
formulas; times are medians of the fwd+bwd step over gloo on this machine's CPU.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

REPEAT = 5


class Counter:
    """Wraps the collectives this benchmark uses and adds up per-rank payload and ring traffic."""

    def __init__(self):
        self.payload = self.ring = 0
        self._orig = {}

    def __enter__(self):
        world = dist.get_world_size()
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor"):
            orig = self._orig[name] = getattr(dist, name)

            def counted(*args, _orig=orig, _name=name, **kwargs):
                t = args[1] if _name == "all_gather" else args[0] if _name == "all_reduce" else args[1]
                size = t.numel() * t.element_size()
                self.payload += size
                self.ring += 2 * (world - 1) / world * size if _name == "all_reduce" else (world - 1) * size
                return _orig(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def _ours(shard, labels):
    import wspo_kernels as wk
    x = shard.detach().requires_grad_()
    wk.token_logprobs(x, labels, vocab_group=dist.group.WORLD).sum().backward()


def _gather(shard, labels):
    import wspo_kernels as wk
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, shard)
    full = torch.cat(parts, dim=-1).requires_grad_()
    wk.token_logprobs(full, labels).sum().backward()


def _worker(rank, world, port, tokens, vocabs, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    rows = []
    for vocab in vocabs:
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, vocab, (tokens,), generator=g)
        logits = torch.randn(tokens, vocab, generator=g)
        shard = logits.tensor_split(world, dim=-1)[rank].contiguous()
        for name, fn in (("ours (vocab_group)", _ours), ("all-gather logits", _gather)):
            fn(shard, labels)  # warm-up
            with Counter() as c:
                fn(shard, labels)
            times = []
            for _ in range(REPEAT):
                dist.barrier()
                t0 = time.perf_counter()
                fn(shard, labels)
                times.append(time.perf_counter() - t0)
            rows.append(dict(vocab=vocab, impl=name, payload_per_token=c.payload / tokens,
                             ring_per_token=c.ring / tokens, median_s=statistics.median(times)))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _formula(impl, vocab, world):
    """Payload each rank contributes per token."""
    if impl.startswith("ours"):
        return 3 * 4  # one fp32 max, two fp32 sums (the handshake is per call, not per token)
    return vocab * 4 // world  # its fp32 shard of the row, which every other rank receives


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "vocab_parallel_comm.md"))
    args = p.parse_args(argv)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = args.out + ".json"
    torch.multiprocessing.spawn(_worker, args=(args.world, port, args.tokens, args.vocab, tmp), nprocs=args.world)
    with open(tmp) as f:
        rows = json.load(f)
    os.remove(tmp)
    lines = [f"Vocab-parallel label log-probs, forward + backward, {args.tokens} tokens, {args.world} gloo ranks "
             f"(1 thread each) on {_cpu()}, torch {torch.__version__}.",
             "", "    python benchmarks/vocab_parallel_comm.py " + " ".join(sys.argv[1:] if argv is None else argv), "",
             "| V | implementation | payload per rank per token: formula | counted | ring traffic per rank per token | median s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['vocab']} | {r['impl']} | {_formula(r['impl'], r['vocab'], args.world)} | "
                     f"{r['payload_per_token']:.1f} | {r['ring_per_token']:.1f} | {r['median_s']:.4f} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
