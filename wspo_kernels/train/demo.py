"""``wspo-kernels demo``: the whole WSPO pipeline end to end on tiny models built from configs.

A synthetic instruction task the demo generates itself: the prompt is a few random symbols, a response
is a permutation of them; the *preferred* response is the sorted one.

1. pretrain a weak (1 layer) and a strong (2 layers, wider) causal LM from random init on shuffled
   responses: both learn the task's format (a permutation of the prompt), neither prefers the order;
2. align the weak model by preferred-response fine-tuning (SFT on sorted responses only);
3. precompute the frozen models' per-token logps (strong reference, weak aligned, weak base) once;
4. train the strong model with WSPO (``WSPOTrainer``, fused linear loss, no frozen model resident), for a
   small sweep of gamma from that one precompute;
5. report, on held-out prompts, with ``wspo-kernels eval``'s own code (``train.evaluate``): each model's
   preference margin log p(sorted) - log p(shuffled), its win rate (margin > 0), the implicit rewards and
   the transfer's amplification per gamma; plus the loss curve (PNG) and the peak memory of a training
   step with the frozen models resident vs precomputed.

Nothing is downloaded; ``--quick`` is the reduced setting CI runs.
"""
import argparse
import copy
import os
import subprocess
import sys
import random
import time

import torch

from .._memory import peak_extra_mib, start_window

SPECIAL = {"pad": 0, "bos": 1, "eos": 2, "sep": 3}
N_SYMBOLS = 12
VOCAB = len(SPECIAL) + N_SYMBOLS


def _example(rng, sort):
    k = rng.randint(3, 5)
    prompt = [rng.randrange(N_SYMBOLS) + len(SPECIAL) for _ in range(k)]
    response = sorted(prompt) if sort else rng.sample(prompt, k)
    return [SPECIAL["bos"]] + prompt + [SPECIAL["sep"]], response + [SPECIAL["eos"]]


def _rows(pairs):
    from .data import build_example
    return [build_example(p, r) for p, r in pairs]


def _model(size, seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    hidden, layers = {"weak": (32, 1), "strong": (64, 2)}[size]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         pad_token_id=SPECIAL["pad"], bos_token_id=SPECIAL["bos"], eos_token_id=SPECIAL["eos"],
                         tie_word_embeddings=size == "weak")
    return LlamaForCausalLM(config)


def _sft(model, rows, steps, lr, desc, batch_size=32, seed=0):
    """Plain next-token fine-tuning on the response tokens (the pretraining and alignment stages)."""
    from tqdm.auto import tqdm
    from .data import WSPODataCollator
    collate = WSPODataCollator(SPECIAL["pad"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        batch = collate(rng.sample(rows, batch_size))
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _peak_step_mib(step):
    """Peak resident memory (MiB) of one call above the resident set before it (Linux; else nan)."""
    base = start_window()
    step()
    return peak_extra_mib(base)


def run(*, quick=False, gamma=0.25, out_dir="wspo_demo", seed=0, log=print):
    import datasets
    from datasets import Dataset
    from transformers import TrainingArguments

    datasets.disable_progress_bars()

    from .precompute import precompute_logps
    from .trainer import WSPOTrainer

    t_start = time.time()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rng = random.Random(seed)
    scale = 0.35 if quick else 1.0
    n_pre, n_align, n_wspo = int(600 * scale), int(300 * scale), int(240 * scale)
    pretrain = _rows([_example(rng, sort=False) for _ in range(2000)])
    aligned_rows = _rows([_example(rng, sort=True) for _ in range(1000)])
    wspo_rows = _rows([_example(rng, sort=True) for _ in range(512)])
    held = [_example(rng, sort=True) for _ in range(200)]
    held_shuffled = [(p, rng.sample(r[:-1], len(r) - 1) + [SPECIAL["eos"]]) for p, r in held]

    weak_base = _sft(_model("weak", seed), pretrain, n_pre, 3e-3, "pretrain weak base")
    strong_base = _sft(_model("strong", seed + 1), pretrain, n_pre, 2e-3, "pretrain strong base")
    weak_aligned = _sft(copy.deepcopy(weak_base), aligned_rows, n_align, 1e-3, "align weak (SFT on preferred)")

    os.makedirs(out_dir, exist_ok=True)
    # One precompute serves every gamma of the sweep: the cached logps do not depend on it.
    data = precompute_logps(Dataset.from_list(wspo_rows), ref_model=strong_base, weak_aligned_model=weak_aligned,
                            weak_base_model=weak_base, batch_size=64, output_dir=os.path.join(out_dir, "precomputed"),
                            resume=False, pad_token_id=SPECIAL["pad"])
    policies, trainer = {}, None
    for g in (gamma,) + tuple(x for x in SWEEP[quick] if x != gamma):
        policy = copy.deepcopy(strong_base)
        args = TrainingArguments(output_dir=os.path.join(out_dir, f"wspo-gamma-{g:g}"), per_device_train_batch_size=32,
                                 gradient_accumulation_steps=1, max_steps=n_wspo, learning_rate=1e-3, logging_steps=5,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=seed, disable_tqdm=False,
                                 lr_scheduler_type="constant")
        run = WSPOTrainer(policy, args, train_dataset=data, gamma=g)
        run.train()
        policies[g] = policy.eval()
        trainer = trainer or run  # the loss curve is the main gamma's

    mem_resident, mem_pre = (_probe(mode, quick) for mode in ("resident", "precomputed"))

    # The held-out report is wspo-kernels eval's own code (train.evaluate), on the models in memory.
    from .evaluate import format_table, score_pairs, summarize
    pairs = [{"chosen": c, "rejected": r} for c, r in zip(_rows(held), _rows(held_shuffled))]
    names = {f"strong after WSPO (gamma {g:g})": m for g, m in policies.items()}
    scores = {name: score_pairs(model, pairs, pad_token_id=SPECIAL["pad"]) for name, model in (
        ("weak base", weak_base), ("weak aligned", weak_aligned), ("strong base", strong_base), *names.items())}
    report = summarize(scores, transfers={n: ("strong base", "weak aligned", "weak base") for n in names},
                       gammas={n: g for n, g in zip(names, policies)})
    eval_config = _save_for_eval(out_dir, weak_base, weak_aligned, strong_base, policies, held, held_shuffled, gamma)
    main_policy = next(iter(names))
    rows = [(n if n != main_policy else "strong after WSPO", m["margin"], m["win"]["rate"])
            for n, m in report["models"].items() if n in ("weak base", "weak aligned", "strong base", main_policy)]
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    png = plot_losses(losses, os.path.join(out_dir, "wspo_loss.png"))
    log(format_table(report))
    log(f"\nWSPO: gamma={gamma}, {n_wspo} steps; loss {losses[0][1]:.4f} -> {losses[-1][1]:.4f}"
        + (f"; curve: {png}" if png else "") + f"\nthe same report from the saved models: wspo-kernels eval {eval_config}")
    shape = dict(PROBE, batch=2, seq=256) if quick else PROBE
    log(f"memory of one training step beyond the policy (vocab {shape['vocab']}, hidden {shape['hidden']}, "
        f"{shape['batch']}x{shape['seq']} tokens): frozen models resident {mem_resident:.0f} MiB (their weights "
        f"+ the step's peak), precomputed {mem_pre:.0f} MiB; total time {time.time() - t_start:.0f} s")
    return dict(rows=rows, report=report, losses=losses, mem_resident=mem_resident, mem_precomputed=mem_pre,
                eval_config=eval_config)


WORDS = ["<pad>", "<s>", "</s>", "<sep>"] + [chr(ord("a") + i) for i in range(N_SYMBOLS)]  # the ids as words


def _save_for_eval(out_dir, weak_base, weak_aligned, strong_base, policies, held, held_shuffled, gamma):
    """The demo's models (with a word-level tokenizer of its symbols), one directory per gamma as a finished
    run leaves it, the held-out pairs as text and a config: ``wspo-kernels eval`` on them gives the
    demo's table."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .cli import RUN_RECORD
    from .storage import write_json_atomically
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    out_dir = os.path.abspath(out_dir)
    dirs = {}
    for name, model in (("weak_base", weak_base), ("weak_aligned", weak_aligned), ("strong_base", strong_base),
                        *((f"wspo-gamma-{g:g}", m) for g, m in policies.items())):
        dirs[name] = os.path.join(out_dir, "models" if name[:4] != "wspo" else "", name)
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    for g in policies:
        write_json_atomically(os.path.join(dirs[f"wspo-gamma-{g:g}"], RUN_RECORD), {"pref_beta": g, "bf16": False})

    def text(ids):
        return " ".join(WORDS[i] for i in ids)
    pairs = os.path.join(out_dir, "heldout_pairs.jsonl")
    with open(pairs, "w") as f:
        for (prompt, chosen), (_, rejected) in zip(held, held_shuffled):
            f.write(json.dumps({"prompt": text(prompt), "chosen": text(chosen[:-1]), "rejected": text(rejected[:-1])})
                    + "\n")
    config = os.path.join(out_dir, "eval.yaml")
    others = ",".join(dirs[f"wspo-gamma-{g:g}"] for g in policies if g != gamma)
    with open(config, "w") as f:
        f.write("\n".join([f"model_name_or_path: {dirs['strong_base']}", f"weak_aligned_model: {dirs['weak_aligned']}",
                           f"weak_base_model: {dirs['weak_base']}", f"output_dir: {dirs[f'wspo-gamma-{gamma:g}']}",
                           f"eval_dataset: {pairs}", f"pref_beta: {gamma}", "template: plain", "use_cpu: true",
                           "bf16: false", "cutoff_len: 32"] + ([f"eval_runs: {others}"] if others else [])) + "\n")
    return config


PROBE = dict(vocab=32000, hidden=256, layers=2, batch=4, seq=512)   # a realistically shaped step
SWEEP = {False: (0.25, 0.5, 1.0), True: (0.25, 1.0)}  # the gammas trained from one precompute (quick: two)


def _probe(mode, quick):
    """Peak memory (MiB) of one WSPO training step at PROBE's shape, in a fresh process, plus the
    weights of the frozen models when they are resident."""
    out = subprocess.run([sys.executable, "-m", "wspo_kernels.train.demo", "--probe", mode]
                         + (["--quick"] if quick else []), capture_output=True, text=True)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


def _probe_step(mode, quick):
    """One WSPO step of a vocab-32000 policy with its three frozen models resident or precomputed."""
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from .data import LOGPS_COLUMNS
    from .trainer import WSPOTrainer
    cfg = dict(PROBE, batch=2, seq=256) if quick else PROBE
    config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=2 * cfg["hidden"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=cfg["seq"])
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    frozen = [LlamaForCausalLM(config) for _ in range(3)] if mode == "resident" else [None] * 3
    batch = dict(input_ids=torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"])))
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, : cfg["seq"] // 4] = -100
    if mode == "precomputed":
        for column in LOGPS_COLUMNS.values():
            batch[column] = -torch.rand(cfg["batch"], cfg["seq"] - 1) * 10
    args = TrainingArguments(output_dir="/tmp/wspo_probe", report_to=[], use_cpu=True)
    trainer = WSPOTrainer(policy, args, ref_model=frozen[0], weak_aligned_model=frozen[1], weak_base_model=frozen[2])

    def step():
        trainer.compute_loss(policy.train(), batch).backward()
        policy.zero_grad(set_to_none=True)
    step()  # warm-up: lazily loaded code, allocator growth
    weights = sum(p.numel() * p.element_size() for m in frozen if m is not None for p in m.parameters()) / 2 ** 20
    return _peak_step_mib(step) + weights  # resident frozen models count with their weights


def plot_losses(losses, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set_xlabel("step")
    ax.set_ylabel("WSPO loss")
    ax.set_title("strong model, fused WSPO loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="wspo-kernels demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the reduced setting (CI)")
    p.add_argument("--gamma", type=float, default=0.25)
    p.add_argument("--out", default="wspo_demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", choices=("resident", "precomputed"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        print(_probe_step(args.probe, args.quick))
        return 0
    run(quick=args.quick, gamma=args.gamma, out_dir=args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
