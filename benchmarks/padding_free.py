"""Padded vs padding-free (packed) batches: a WSPO training step, and the precompute pass against its floor.

    python benchmarks/padding_free.py                                  # the defaults below, ~5 minutes on 2 cores
    python benchmarks/padding_free.py --rows 64 --micro-batch 8 --cutoff 1024 --out benchmarks/results/padding_free_cpu.md
    python benchmarks/padding_free.py --device cuda --rows 512 --micro-batch 8 --cutoff 4096   # what gpu_validate.py runs

Model: a small Llama-shaped model (4 layers, hidden 256, 8 heads / 4 KV heads, vocabulary 32000, fp32,
``attn_implementation=sdpa``; random weights).  Data: UltraFeedback-like lengths -- prompt and response
token counts drawn from log-normal distributions (medians 120 and 220 tokens, sigma 0.9 and 0.8: a long
tail of long prompts and answers), cut to ``--cutoff`` by the official rule (``infer_seqlen``).

Training: ``WSPOTrainer`` with precomputed frozen logps (one model's, for all three roles: a step's cost does
not depend on their values), micro-batch ``--micro-batch``, one optimizer step
per micro-batch; each mode in its own process (its peak memory is the process's: VmHWM above the resident
set before training), the two modes alternated ``--repeats`` times; tokens/s counts real (non-pad) tokens,
median over the steps after the first.

Precompute: ``precompute_logps`` in the dataset's order in batches of ``--micro-batch`` rows (before) and
longest-first in batches of similar lengths up to ``--batch-tokens`` (now), against the floor: a plain,
unpadded forward of the same model over the same tokens (each row alone, full logits, inference mode);
the three interleaved in one process, ``--repeats`` rounds, the median of per-round ratios.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from wspo_kernels._memory import status_mib
from wspo_kernels.bench.runner import machine_identity

MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=0, attn_implementation="sdpa")
PROMPT_MEDIAN, PROMPT_SIGMA, RESPONSE_MEDIAN, RESPONSE_SIGMA = 120, 0.9, 220, 0.8


def make_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**MODEL))


def make_rows(n, cutoff, seed=0):
    """Tokenised rows with UltraFeedback-like prompt / response lengths (see the module docstring)."""
    from wspo_kernels.train.data import build_example
    g = torch.Generator().manual_seed(seed)
    lengths = lambda median, sigma: torch.exp(torch.randn(n, generator=g) * sigma + torch.log(  # noqa: E731
        torch.tensor(float(median)))).round().clamp_min(1).long().tolist()
    prompts, responses = lengths(PROMPT_MEDIAN, PROMPT_SIGMA), lengths(RESPONSE_MEDIAN, RESPONSE_SIGMA)
    rows = []
    for p, r in zip(prompts, responses):
        ids = torch.randint(1, MODEL["vocab_size"], (p + r,), generator=g).tolist()
        rows.append(build_example(ids[:p], ids[p:], max_length=cutoff))
    return rows


# ------------------------------------------------------------------------------------------ training
def train_child(rows_path, padding_free, micro_batch, steps, device="cpu"):
    """One mode in this (fresh) process: real tokens/s of each step, positions computed, peak memory."""
    import datasets
    from transformers import TrainerCallback, TrainingArguments
    from wspo_kernels.train import WSPOTrainer
    with open(rows_path) as f:
        rows = json.load(f)
    times, real, positions = [], [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    class Counting(WSPOTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            mask = inputs.get("attention_mask")
            real.append(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
            positions.append(inputs["input_ids"].numel())
            return super().compute_loss(model, inputs, *a, **k)
    with tempfile.TemporaryDirectory() as out:
        gpu = device.startswith("cuda")  # bf16 mixed precision there, the model's own attention (sdpa)
        args = TrainingArguments(output_dir=out, report_to=[], use_cpu=not gpu, bf16=gpu, save_strategy="no",
                                 per_device_train_batch_size=micro_batch, max_steps=steps, learning_rate=1e-5,
                                 logging_steps=10 ** 6, seed=0)
        trainer = Counting(make_model(), args, train_dataset=datasets.Dataset.from_list(rows), gamma=0.1,
                           padding_free=padding_free, callbacks=[Clock()])
        base = torch.cuda.memory_allocated() / 2 ** 20 if gpu else status_mib("VmRSS")
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if gpu else status_mib("VmHWM")) - base
    return dict(tokens_per_s=[t / s for t, s in zip(real[1:], times[1:])], peak_mib=peak, tokens=real,
                positions=positions)


# ------------------------------------------------------------------------------------------ precompute
def precompute_rounds(rows, micro_batch, batch_tokens, repeats, device="cpu"):
    import datasets
    from wspo_kernels.train import precompute_logps
    from wspo_kernels.train.precompute import length_batches
    gpu = device.startswith("cuda")
    model = make_model(1).to(device=device, dtype=torch.bfloat16 if gpu else torch.float32).eval()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    ds = datasets.Dataset.from_list(rows)
    tokens = sum(len(r["input_ids"]) for r in rows)

    def before():
        precompute_logps(ds, ref_model=model, batch_size=micro_batch, shard_size=len(rows), progress=False)

    def now():
        return precompute_logps(ds, ref_model=model, batch_size=micro_batch, batch_tokens=batch_tokens,
                                shard_size=len(rows), progress=False)

    def floor():
        with torch.inference_mode():
            for r in rows:
                model(input_ids=torch.tensor([r["input_ids"]], device=device), use_cache=False)
    column = now()["ref_logps"]  # the frozen logps the training runs read (see main)
    runs = {"before": before, "now": now, "floor": floor}
    for fn in runs.values():
        fn()  # warm-up
    times = {k: [] for k in runs}
    for r in range(repeats):
        names = list(runs)[r % 3:] + list(runs)[:r % 3]
        for k in names:
            sync()
            t0 = time.perf_counter()
            runs[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
    lengths = [len(r["input_ids"]) for r in rows]
    fixed = [list(range(b, min(len(rows), b + micro_batch))) for b in range(0, len(rows), micro_batch)]
    share = lambda batches: 1 - tokens / sum(len(b) * max(lengths[i] for i in b) for b in batches)  # noqa: E731
    return dict(tokens=tokens, times=times, pad_before=share(fixed),
                pad_now=share(length_batches(lengths, batch_tokens, micro_batch)), logps=column)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--cutoff", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per training process")
    p.add_argument("--repeats", type=int, default=2, help="training processes per mode; precompute rounds + 1")
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 mixed-precision training, bf16 precompute)")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(train_child(args.child[0], args.child[1] == "packed", args.micro_batch, args.steps,
                                     args.device)))
        return
    rows = make_rows(args.rows, args.cutoff)
    lengths = [len(r["input_ids"]) for r in rows]
    pre = precompute_rounds(rows, args.micro_batch, args.batch_tokens, args.repeats + 1, args.device)
    # A training step's cost does not depend on the frozen logps' values: one model's logps stand for all three.
    rows = [dict(r, ref_logps=lp, weak_aligned_logps=lp, weak_base_logps=lp) for r, lp in zip(rows, pre.pop("logps"))]
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = os.path.join(tmp, "rows.json")
        with open(rows_path, "w") as f:
            json.dump(rows, f)
        train = {"padded": [], "packed": []}
        for _ in range(args.repeats):
            for mode in ("padded", "packed"):
                out = subprocess.run([sys.executable, __file__, "--child", rows_path, mode, "--micro-batch",
                                      str(args.micro_batch), "--steps", str(args.steps), "--device", args.device],
                                     capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                train[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"train {mode}: {statistics.median(train[mode][-1]['tokens_per_s']):.0f} tokens/s, "
                      f"{train[mode][-1]['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)

    ident = machine_identity(args.device)
    tps = {m: statistics.median(v for run in runs for v in run["tokens_per_s"]) for m, runs in train.items()}
    peak = {m: statistics.median(run["peak_mib"] for run in runs) for m, runs in train.items()}
    first = train["padded"][0]
    pad_share = 1 - sum(first["tokens"]) / sum(first["positions"])
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(pre["times"][a], pre["times"][b]))  # noqa: E731
    lines = [
        (f"{ident['gpu']} (bf16 mixed precision)" if ident.get("gpu") else
         f"{ident['cpu']} ({ident.get('cpu_isa')}, {ident['threads']} threads)") + f", torch {torch.__version__}; "
        f"`python benchmarks/padding_free.py --rows {args.rows} --micro-batch {args.micro_batch} --cutoff {args.cutoff} "
        f"--steps {args.steps} --repeats {args.repeats} --device {args.device}`", "",
        f"Model: Llama-shaped, {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, vocabulary "
        f"{MODEL['vocab_size']}, fp32, sdpa. Data: {args.rows} rows, prompt / response lengths log-normal (medians "
        f"{PROMPT_MEDIAN} / {RESPONSE_MEDIAN} tokens, sigma {PROMPT_SIGMA} / {RESPONSE_SIGMA}), cut at {args.cutoff}: "
        f"row lengths median {statistics.median(lengths):.0f}, max {max(lengths)}, mean {statistics.mean(lengths):.0f}.",
        "", "| training step, micro-batch %d | tokens/s (real tokens) | peak MiB | padded positions |" % args.micro_batch,
        "|---|---|---|---|",
        f"| padded | {tps['padded']:.0f} | {peak['padded']:.0f} | {pad_share:.0%} |",
        f"| padding_free (packed) | {tps['packed']:.0f} ({tps['packed'] / tps['padded']:.2f}x) | {peak['packed']:.0f} | 0% |",
        "", "| precompute, one frozen model | tokens/s | % of the floor | padded positions |", "|---|---|---|---|",
        f"| before: dataset order, batches of {args.micro_batch} | "
        f"{pre['tokens'] / statistics.median(pre['times']['before']):.0f} | {ratio('floor', 'before'):.0%} | "
        f"{pre['pad_before']:.0%} |",
        f"| now: longest first, up to {args.batch_tokens} tokens / {args.micro_batch} rows | "
        f"{pre['tokens'] / statistics.median(pre['times']['now']):.0f} | {ratio('floor', 'now'):.0%} | "
        f"{pre['pad_now']:.0%} |",
        f"| floor: each row alone, unpadded, full logits | {pre['tokens'] / statistics.median(pre['times']['floor']):.0f} "
        "| 100% | 0% |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
