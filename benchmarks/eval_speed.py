"""``wspo-kernels eval``'s scoring speed against its floor: a bare forward of the same model.

    python benchmarks/eval_speed.py [--rows 96] [--rounds 5] [--batch-tokens 4096] [--out benchmarks/results/eval_cpu.md]

Both sides see the same rows in the same length-sorted batches (``evaluate.length_batches``) under
``torch.inference_mode``: ``sequence_logps`` (the model's hidden states, then ``linear_token_logprobs``
over the vocabulary in chunks, summed per row) against ``model(input_ids, attention_mask)`` returning
its full logits (what scoring costs at the least: the same layers and the same lm_head GEMM), and, for
context, the layers alone (``logits_to_keep=1``: no lm_head).  They are timed round-robin in one process
(A B C A B C ...), and the ratio is the median of the per-round ratios, with its range.  Rows: lengths drawn like preference data (lognormal prompt and response, cut
at 512); a Llama-shaped model with a 32000-token vocabulary.  Peak memory is not compared here: the bare
forward holds batch x length x vocab fp32 logits, scoring one chunk of them.
"""
import argparse
import os
import platform
import statistics
import time

import torch

from wspo_kernels.train import evaluate
from wspo_kernels.train.data import WSPODataCollator


def rows(n, seed=0, cutoff=512):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = int(min(cutoff // 2, max(4, torch.empty(()).log_normal_(4.0, 0.8, generator=g).item())))
        response = int(min(cutoff - prompt, max(2, torch.empty(()).log_normal_(4.5, 0.8, generator=g).item())))
        ids = torch.randint(3, 32000, (prompt + response,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def model(hidden, layers, vocab=32000):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


@torch.inference_mode()
def bare_forward(m, data, batch_tokens, **kwargs):
    collate = WSPODataCollator(0)
    for batch_rows in evaluate.length_batches([len(r["input_ids"]) for r in data], batch_tokens):
        batch = collate([data[i] for i in batch_rows])
        m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    data = rows(args.rows)
    m = model(args.hidden, args.layers)
    tokens = sum(len(r["input_ids"]) for r in data)
    padded = sum(len(b) * len(data[b[0]]["input_ids"]) for b in evaluate.length_batches(
        [len(r["input_ids"]) for r in data], args.batch_tokens))

    def ours():
        evaluate.sequence_logps(m, data, batch_tokens=args.batch_tokens)

    def floor():
        bare_forward(m, data, args.batch_tokens)

    def trunk():  # context, not a floor: the layers without the lm_head (logits of the last position only)
        bare_forward(m, data, args.batch_tokens, logits_to_keep=1)
    ours(), floor(), trunk()  # warm-up
    times = {"scoring": [], "bare forward": [], "layers only (no lm_head)": []}
    for _ in range(args.rounds):
        for name, fn in (("scoring", ours), ("bare forward", floor), ("layers only (no lm_head)", trunk)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ratios = [f / o for o, f in zip(times["scoring"], times["bare forward"])]
    isa = torch.backends.cpu.get_cpu_capability()
    lines = [f"eval scoring vs a bare forward; {args.rows} rows, {tokens} tokens ({padded / tokens - 1:.1%} padding), "
             f"Llama hidden {args.hidden} x {args.layers} layers, vocab 32000, batches of <= {args.batch_tokens} "
             f"padded tokens; fp32; {platform.processor() or platform.machine()}, torch {torch.__version__} "
             f"({isa}), {torch.get_num_threads()} threads; {args.rounds} interleaved rounds",
             "", "| | median s | tokens/s | % of the bare forward's speed (median of per-round ratios, range) |",
             "|---|---|---|---|"]
    for name in times:
        t = statistics.median(times[name])
        share = {"scoring": f"{statistics.median(ratios):.1%} ({min(ratios):.1%} - {max(ratios):.1%})",
                 "bare forward": "100% (the floor)"}.get(name, "-")
        lines.append(f"| {name} | {t:.3f} | {tokens / t:,.0f} | {share} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(f"Command: `python benchmarks/eval_speed.py --out {args.out}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
