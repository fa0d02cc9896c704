"""Did the weak-to-strong transfer work?  Preference margins and implicit rewards on held-out pairs.

For model m and a response y to prompt x, the sequence log-probability is the sum over its response
tokens, s_m(y) = sum_t log p_m(y_t | x, y_<t), computed with ``linear_token_logprobs`` from the model's
final hidden states (no full logits; one model resident at a time, rows batched by length under
``torch.inference_mode``).  For a pair (chosen c, rejected r):

- preference margin of a model:   M_m = s_m(c) - s_m(r)         (nats; also per token: s/n of each half)
- its win rate:                   the share of pairs with M_m > 0, with a 95% Wilson interval
- implicit reward of model a over model b (DPO's reward difference, without its beta):
                                  R_ab = [s_a(c) - s_b(c)] - [s_a(r) - s_b(r)] = M_a - M_b
  its accuracy is the share of pairs with R_ab > 0 (the log-ratio ranks chosen above rejected), its
  mean the gain of a over b.
- transfer: the weak pair's gain G_w = mean R(weak aligned, weak base), the strong pair's gain
  G_s = mean R(policy, strong reference), and the amplification G_s / G_w.  WSPO regresses
  gamma * (policy - reference) onto (aligned - base) per token, so a transfer that worked has an
  amplification near 1 / gamma.

``score_pairs`` and ``summarize`` are the library; ``main`` is ``wspo-kernels eval`` (the train config's
keys plus ``eval_dataset``), and the demo's table comes from the same two functions.
"""
import contextlib
import math
import os

import torch

from .. import linear_token_logprobs
from .data import WSPODataCollator
from .model_io import lm_head_inputs

Z_95 = 1.959963984540054  # two-sided 95% normal quantile, for the Wilson interval
DEFAULT_BATCH_TOKENS = 16384  # padded tokens per forward: rows sorted by length keep padding small


def wilson_interval(wins, n, z=Z_95):
    """95% Wilson score interval of a binomial proportion (sound at 0 and n wins, unlike the normal one)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def length_batches(lengths, batch_tokens):
    """Row indices grouped longest first, each group's padded size (rows x longest) within ``batch_tokens``
    (a row longer than the budget goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and lengths[current[0]] * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + ([current] if current else [])


@torch.inference_mode()
def sequence_logps(model, rows, *, pad_token_id=0, batch_tokens=DEFAULT_BATCH_TOKENS, backend=None,
                   autocast_dtype=None, progress=None):
    """(sum of the response tokens' logps [N] float64, response token count [N]) of tokenised rows
    ({"input_ids", "labels"}, prompt labels -100)."""
    device = next(model.parameters()).device
    collate = WSPODataCollator(pad_token_id)
    sums = torch.zeros(len(rows), dtype=torch.float64)
    counts = torch.zeros(len(rows), dtype=torch.long)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    model.eval()
    for batch_rows in length_batches([len(r["input_ids"]) for r in rows], batch_tokens):
        batch = collate([rows[i] for i in batch_rows])
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        with amp:
            hidden, weight, bias = lm_head_inputs(model, ids, mask)
            logps = linear_token_logprobs(hidden, weight, labels, bias=bias, shift=True, backend=backend)
        index = torch.tensor(batch_rows)
        sums[index] = logps.double().sum(-1).cpu()  # ignored positions hold 0
        counts[index] = (labels[:, 1:] != -100).sum(-1).cpu()
        if progress is not None:
            progress.update(len(batch_rows))
    return sums, counts


def score_pairs(model, pairs, **kwargs):
    """{"chosen", "rejected"} sums of logps [N] float64 and {"chosen_tokens", "rejected_tokens"} counts of
    ``pairs`` ([{"chosen": row, "rejected": row}]), chosen and rejected rows batched together."""
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    sums, counts = sequence_logps(model, rows, **kwargs)
    n = len(pairs)
    return {"chosen": sums[:n], "rejected": sums[n:], "chosen_tokens": counts[:n], "rejected_tokens": counts[n:]}


def _rate(hits):
    n, k = hits.numel(), int(hits.sum())
    return {"rate": k / n if n else float("nan"), "ci95": list(wilson_interval(k, n))}


def model_summary(scores):
    margin = scores["chosen"] - scores["rejected"]
    per_token = (scores["chosen"] / scores["chosen_tokens"].clamp_min(1)
                 - scores["rejected"] / scores["rejected_tokens"].clamp_min(1))
    return {"margin": margin.mean().item(), "margin_per_token": per_token.mean().item(), "win": _rate(margin > 0)}


def reward_summary(a, b):
    """The implicit reward of model a over model b (see the module docstring)."""
    reward = (a["chosen"] - b["chosen"]) - (a["rejected"] - b["rejected"])
    return {"gain": reward.mean().item(), "accuracy": _rate(reward > 0), "ties": int((reward == 0).sum())}


def summarize(scores, *, policies, reference="strong reference", weak=("weak aligned", "weak base"), gammas=None):
    """The report: every model's margins and win rate, each policy's and the weak pair's implicit reward,
    and the transfer (gains and amplification) per policy.  ``scores``: {name: score_pairs(...)};
    ``policies``: names of the trained policies; ``gammas``: {policy: gamma} for the expected 1/gamma."""
    gammas = gammas or {}
    n = len(next(iter(scores.values()))["chosen"])
    report = {"pairs": n, "models": {name: model_summary(s) for name, s in scores.items()}, "rewards": {},
              "transfer": {}}
    weak_gain = None
    if all(w in scores for w in weak):
        report["rewards"][f"{weak[0]} vs {weak[1]}"] = reward_summary(scores[weak[0]], scores[weak[1]])
        weak_gain = report["rewards"][f"{weak[0]} vs {weak[1]}"]["gain"]
    for policy in policies:
        if policy not in scores or reference not in scores:
            continue
        reward = reward_summary(scores[policy], scores[reference])
        report["rewards"][f"{policy} vs {reference}"] = reward
        gamma = gammas.get(policy)
        report["transfer"][policy] = {
            "weak_gain": weak_gain, "strong_gain": reward["gain"],
            "amplification": reward["gain"] / weak_gain if weak_gain else float("nan"),
            "gamma": gamma, "expected_amplification": 1 / gamma if gamma else None}
    return report


def format_table(report):
    """The report as Markdown tables (what ``wspo-kernels eval`` prints)."""
    n = report["pairs"]
    out = [f"{n} held-out pairs; margin = log p(chosen) - log p(rejected); win = margin > 0 (95% Wilson interval)", "",
           "| model | margin (nats) | margin per token | win rate |", "|---|---|---|---|"]
    for name, m in report["models"].items():
        lo, hi = m["win"]["ci95"]
        out.append(f"| {name} | {m['margin']:+.3f} | {m['margin_per_token']:+.4f} | {m['win']['rate']:.1%} "
                   f"[{lo:.1%}, {hi:.1%}] |")
    if report["rewards"]:
        out += ["", "| implicit reward (log-ratio) | mean gain (nats) | accuracy |", "|---|---|---|"]
        for name, r in report["rewards"].items():
            lo, hi = r["accuracy"]["ci95"]
            out.append(f"| {name} | {r['gain']:+.3f} | {r['accuracy']['rate']:.1%} [{lo:.1%}, {hi:.1%}] |")
    if report["transfer"]:
        out += ["", "| policy | weak gain | strong gain | amplification | expected (1/gamma) |", "|---|---|---|---|---|"]
        for name, t in report["transfer"].items():
            expected = f"{t['expected_amplification']:.2f}" if t["expected_amplification"] else "-"
            weak_gain = f"{t['weak_gain']:+.3f}" if t["weak_gain"] is not None else "-"
            out.append(f"| {name} | {weak_gain} | {t['strong_gain']:+.3f} | {t['amplification']:.2f} | {expected} |")
    return "\n".join(out)


def plot_report(report, path):
    """Margins per model and win rates with their intervals, side by side; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(report["models"])
    models = [report["models"][n] for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.45 * len(names) + 1.8))
    y = range(len(names))
    left.barh(y, [m["margin"] for m in models], color="tab:blue")
    left.axvline(0, color="black", linewidth=0.8)
    left.set_yticks(list(y), names)
    left.set_xlabel("mean margin log p(chosen) - log p(rejected) (nats)")
    rates = [m["win"]["rate"] for m in models]
    errors = [[max(0.0, r - m["win"]["ci95"][0]) for r, m in zip(rates, models)],  # rounding at 0 and 1
              [max(0.0, m["win"]["ci95"][1] - r) for r, m in zip(rates, models)]]
    right.barh(y, rates, xerr=errors, color="tab:green", capsize=3)
    right.axvline(0.5, color="black", linewidth=0.8, linestyle="--")
    right.set_yticks(list(y), [""] * len(names))
    right.set_xlim(0, 1)
    left.invert_yaxis()  # the first model on top, as in the table (the axes share the order)
    right.invert_yaxis()
    right.set_xlabel(f"win rate (margin > 0), 95% interval, {report['pairs']} pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report, out_dir, *, log=print):
    """Table to ``log``, ``wspo_eval.json`` and ``wspo_eval.png`` into ``out_dir``."""
    from . import storage
    os.makedirs(out_dir, exist_ok=True)
    log(format_table(report))
    storage.write_json_atomically(os.path.join(out_dir, "wspo_eval.json"), report)
    with storage.writing(out_dir, "the evaluation plot"):
        png = plot_report(report, os.path.join(out_dir, "wspo_eval.png"))
    return os.path.join(out_dir, "wspo_eval.json"), png



# ---------------------------------------------------------------- wspo-kernels eval CONFIG.yaml [key=value ...]
def read_pairs(path, tokenizer, cutoff, *, truncation="infer_seqlen", template="auto"):
    """Tokenised held-out pairs [{"chosen": row, "rejected": row}], both halves cut by the official rule
    (the longer response budgets the cut); rows left without a response token are dropped and counted."""
    from .config import ConfigError
    from .data import build_example, encode_prompt_response
    from .formats import prompt_response, read_records
    try:
        records = read_records(path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"eval_dataset {path!r}: {e}") from None
    chat = False if template == "plain" else None
    pairs, dropped = [], 0
    for i, record in enumerate(records):
        try:
            prompt, chosen, rejected = prompt_response(record, i)
        except ValueError as e:
            raise ConfigError(f"eval_dataset {path!r}: {e}") from None
        if rejected is None:
            raise ConfigError(f"eval_dataset {path!r}: row {i} has no rejected response (keys {sorted(record)}); eval "
                              "needs preference pairs: prompt, chosen and rejected")
        prompt_ids, chosen_ids = encode_prompt_response(tokenizer, prompt, chosen, chat_template=chat)
        rejected_ids = encode_prompt_response(tokenizer, prompt, rejected, chat_template=chat)[1]
        rows = [build_example(prompt_ids, a, max_length=cutoff, truncation=truncation, paired_len=len(b))
                for a, b in ((chosen_ids, rejected_ids), (rejected_ids, chosen_ids))]
        if None in rows:
            dropped += 1
        else:
            pairs.append({"chosen": rows[0], "rejected": rows[1]})
    if not pairs:
        raise ConfigError(f"eval_dataset {path!r}: no pair keeps a response token within {cutoff} tokens")
    return pairs, dropped


def _tokenizer_of(path):
    from transformers import AutoTokenizer
    if not (os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                        for f in ("tokenizer.json", "tokenizer_config.json"))):
        return None
    return AutoTokenizer.from_pretrained(path)


def check_same_tokenizer(tokenizer, sources):
    """WSPO compares the models token by token: a model shipped with another vocabulary is refused."""
    from .config import ConfigError
    vocab = tokenizer.get_vocab()
    for key, path in sources.items():
        other = _tokenizer_of(path)
        if other is not None and other.get_vocab() != vocab:
            raise ConfigError(f"{key} ({path}) has another tokenizer than model_name_or_path ({len(other.get_vocab())} "
                              f"vs {len(vocab)} tokens, or other ids): WSPO compares the four models token by token")


def _saved_policy(path):
    """'lora', 'full' or None: what a run's output_dir (or a checkpoint) holds."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "lora"
    weights = any(f.endswith((".safetensors", ".bin")) and not f.startswith("training_args") for f in os.listdir(path))
    return "full" if os.path.isfile(os.path.join(path, "config.json")) and weights else None


def _run_gamma(path):
    from .cli import RUN_RECORD
    from .storage import read_json
    return (read_json(os.path.join(path, RUN_RECORD)) or {}).get("pref_beta")


def models_to_score(config, log):
    """([(name, path, kind)], policy names, {policy: gamma}): the weak pair, the strong reference, then every
    policy -- this run's checkpoints (``eval_checkpoints``), its final model, other runs' (``eval_runs``) --
    each with the gamma its run recorded (this run's: ``pref_beta``)."""
    from .checkpoints import _checkpoints, why_incomplete
    from .config import ConfigError
    w, out = config.wspo, config.training.output_dir
    this_gamma = (_run_gamma(out) if os.path.isdir(out) else None) or w.pref_beta
    policies = []  # (name, path, gamma)
    if w.eval_checkpoints:
        found = ([p for _, p in sorted(_checkpoints(out)) if why_incomplete(p) is None]
                 if w.eval_checkpoints.strip() == "all" else [p.strip() for p in w.eval_checkpoints.split(",")])
        policies += [(os.path.basename(os.path.normpath(p)), p, this_gamma) for p in found]
    if os.path.isdir(out) and _saved_policy(out):
        policies.append(("policy", out, this_gamma))
    else:
        log(f"{out} holds no trained model (yet): scoring the frozen models" + (" and checkpoints" if policies else ""))
    for run in (r.strip() for r in (w.eval_runs or "").split(",") if r.strip()):
        gamma = _run_gamma(run) if os.path.isdir(run) else None
        policies.append((f"policy {os.path.basename(os.path.normpath(run))}", run, gamma))
    models = [("weak base", w.weak_base_model, "full"), ("weak aligned", w.weak_aligned_model, "full"),
              ("strong reference", w.ref_model or w.model_name_or_path, "full")]
    for name, path, _ in policies:
        kind = _saved_policy(path) if os.path.isdir(path) else None
        if kind is None:
            raise ConfigError(f"{path!r} holds no trained model to evaluate (a finished run's output_dir or checkpoint)")
        models.append((name, path, kind))
    return models, [n for n, _, _ in policies], {n: g for n, _, g in policies}


def _load(path, kind, base, dtype, device):
    from .cli import _load_model
    if kind == "lora":
        from peft import PeftModel
        from .storage import read_json
        base_path = (read_json(os.path.join(path, "adapter_config.json")) or {}).get("base_model_name_or_path") or base
        return PeftModel.from_pretrained(_load_model(base_path, dtype), path).to(device)
    return _load_model(path, dtype).to(device)


def main(argv):
    """``wspo-kernels eval CONFIG.yaml [key=value ...]``: the report for the run in ``output_dir``."""
    import time

    from transformers import AutoTokenizer
    from tqdm.auto import tqdm

    from .cli import _dtype, _local, _say, effective_cutoff, prepare_dataset
    from .config import EVAL_REQUIRED, parse_config
    config = parse_config([argv] if isinstance(argv, str) else argv, prog="wspo-kernels eval", required=EVAL_REQUIRED)
    w, args = config.wspo, config.training
    cutoff = effective_cutoff(w)
    tokenizer = AutoTokenizer.from_pretrained(_local(w.model_name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_same_tokenizer(tokenizer, {k: _local(getattr(w, k)) for k in ("ref_model", "weak_aligned_model",
                                                                         "weak_base_model") if getattr(w, k)})
    pairs, dropped = read_pairs(w.eval_dataset, tokenizer, cutoff, truncation=w.truncation, template=w.template)
    _say(f"{len(pairs)} pairs from {w.eval_dataset}" + (f"; {dropped} dropped (no response token within {cutoff} "
                                                         "tokens)" if dropped else ""))
    if w.dataset:
        seen = {tuple(r) for r in prepare_dataset(w, tokenizer, cutoff)["input_ids"]}
        overlap = sum(tuple(p["chosen"]["input_ids"]) in seen for p in pairs)
        if overlap:
            _say(f"warning: {overlap} of {len(pairs)} eval pairs also appear in the training data ({w.dataset}): "
                 "their margins are not held out")
    models, policies, gammas = models_to_score(config, _say)
    dtype = _dtype(args)
    autocast = None if dtype == torch.float32 else dtype
    device = "cpu" if args.use_cpu or not torch.cuda.is_available() else "cuda"
    scores, speed = {}, {}
    for name, path, kind in models:  # one model resident at a time
        model = _load(_local(path), kind, _local(w.model_name_or_path), dtype, device)
        with tqdm(total=2 * len(pairs), desc=f"eval {name}", unit="row") as bar:
            start = time.perf_counter()
            scores[name] = score_pairs(model, pairs, pad_token_id=tokenizer.pad_token_id, backend=w.backend,
                                       batch_tokens=w.eval_batch_tokens, autocast_dtype=autocast, progress=bar)
            seconds = time.perf_counter() - start
        tokens = sum(len(p[h]["input_ids"]) for p in pairs for h in ("chosen", "rejected"))
        speed[name] = tokens / seconds
        del model
    report = summarize(scores, policies=policies, gammas=gammas)
    report.update(eval_dataset=os.path.abspath(w.eval_dataset), dropped_pairs=dropped,
                  models={n: dict(report["models"][n], path=os.path.abspath(_local(p)), tokens_per_second=speed[n])
                          for n, p, _ in models},
                  numerics=f"{dtype}" + (f" under autocast {autocast}" if autocast else ""))
    json_path, png = write_report(report, args.output_dir, log=print)
    _say(f"report -> {json_path}" + (f", {png}" if png else ""))
    return report
