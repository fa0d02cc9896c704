"""``wspo-kernels eval``'s scoring speed against its floor: the same model's layers and lm_head GEMM.

    python benchmarks/eval_speed.py [--dtype fp32|bf16] [--rows 96] [--rounds 5] [--out benchmarks/results/eval_cpu.md]

Every case sees the same rows in the same length-sorted batches (``evaluate.length_batches``) under
``torch.inference_mode`` (and, with ``--dtype bf16``, the CPU autocast eval runs under by default):
- scoring: ``sequence_logps`` -- the model's hidden states, then ``linear_token_logprobs`` over the
  vocabulary in chunks, summed per row;
- the floor: what scoring cannot do without -- the layers (``logits_to_keep=1``) and the lm_head GEMM
  over the counted positions (response tokens: a prompt's logits are never needed), in chunks of
  CHUNK_ROWS rows into one preallocated buffer (no softmax, no sums);
- for reference, a bare forward returning the full logits (it also pays for a batch x vocab fp32 tensor)
  and the layers alone.
They are timed round-robin in one process (A B C D A B C D ...); each ratio is the median of the
per-round ratios, with its range.  Rows: lengths drawn like preference data (lognormal prompt and
response, cut at 512); a Llama-shaped model with a 32000-token vocabulary.  Peak memory beyond the
weights, each in a fresh process.
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


def peak_in_fresh_process(case, args):
    """Peak resident memory (MiB) of one pass of ``case`` above what the process held before it (the
    model's weights, the rows): in a fresh process, as every CPU memory figure here."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, __file__, "--peak", case, "--rows", str(args.rows), "--batch-tokens",
                          str(args.batch_tokens), "--hidden", str(args.hidden), "--layers", str(args.layers),
                          "--dtype", args.dtype],
                         capture_output=True, text=True)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


CHUNK_ROWS = 1024


@torch.inference_mode()
def layers_and_head_gemm(m, data, batch_tokens):
    collate = WSPODataCollator(0)
    weight = m.get_output_embeddings().weight
    buffer = None
    for batch_rows in evaluate.length_batches([len(r["input_ids"]) for r in data], batch_tokens):
        batch = collate([data[i] for i in batch_rows])
        hidden = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                   logits_to_keep=1).hidden_states[-1]
        hidden = hidden[:, :-1][batch["labels"][:, 1:] != -100]  # the counted positions: response tokens
        hidden = hidden.to(torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu") else hidden
        w = weight.to(hidden.dtype)
        if buffer is None or buffer.dtype != hidden.dtype:
            buffer = torch.empty(CHUNK_ROWS, w.shape[0], dtype=hidden.dtype)
        for lo in range(0, hidden.shape[0], CHUNK_ROWS):
            chunk = hidden[lo:lo + CHUNK_ROWS]
            torch.mm(chunk, w.t(), out=buffer[: chunk.shape[0]])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--out", default=None)
    p.add_argument("--peak", choices=("scoring", "bare forward"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    data = rows(args.rows)
    m = model(args.hidden, args.layers)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    if args.peak:
        from wspo_kernels._memory import peak_extra_mib, start_window
        base = start_window()
        with amp:
            if args.peak == "scoring":
                evaluate.sequence_logps(m, data, batch_tokens=args.batch_tokens)
            else:
                bare_forward(m, data, args.batch_tokens)
        print(peak_extra_mib(base))
        return 0
    tokens = sum(len(r["input_ids"]) for r in data)
    padded = sum(len(b) * len(data[b[0]]["input_ids"]) for b in evaluate.length_batches(
        [len(r["input_ids"]) for r in data], args.batch_tokens))

    cases = {"scoring": lambda: evaluate.sequence_logps(m, data, batch_tokens=args.batch_tokens),
             "floor: layers + lm_head GEMM": lambda: layers_and_head_gemm(m, data, args.batch_tokens),
             "bare forward (full logits)": lambda: bare_forward(m, data, args.batch_tokens),
             "layers only (no lm_head)": lambda: bare_forward(m, data, args.batch_tokens, logits_to_keep=1)}
    times = {name: [] for name in cases}
    with amp:
        for fn in cases.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    def share(name, of):
        ratios = [f / o for o, f in zip(times[name], times[of])]
        return f"{statistics.median(ratios):.1%} ({min(ratios):.1%} - {max(ratios):.1%})"
    isa = torch.backends.cpu.get_cpu_capability()
    lines = [f"eval scoring vs its floor; {args.rows} rows, {tokens} tokens ({padded / tokens - 1:.1%} padding), "
             f"Llama hidden {args.hidden} x {args.layers} layers, vocab 32000, batches of <= {args.batch_tokens} "
             f"padded tokens; {args.dtype}{' (CPU autocast)' if args.dtype == 'bf16' else ''}; "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__} ({isa}), "
             f"{torch.get_num_threads()} threads; {args.rounds} interleaved rounds",
             "", "| | median s | tokens/s | % of the floor's speed (median of per-round ratios, range) | "
                 "% of a bare forward's speed | peak MiB beyond the weights (fresh process) |",
             "|---|---|---|---|---|---|"]
    peaks = {"scoring": peak_in_fresh_process("scoring", args),
             "bare forward (full logits)": peak_in_fresh_process("bare forward", args)}
    for name in times:
        t = statistics.median(times[name])
        floor = "100% (the floor)" if name.startswith("floor") else share(name, "floor: layers + lm_head GEMM")
        bare = share(name, "bare forward (full logits)") if name == "scoring" else "-"
        peak = f"{peaks[name]:.0f}" if name in peaks else "-"
        lines.append(f"| {name} | {t:.3f} | {tokens / t:,.0f} | {floor} | {bare} | {peak} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "a") as f:
            f.write(f"Command: `python benchmarks/eval_speed.py --dtype {args.dtype} --out {args.out}`\n\n{text}\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
