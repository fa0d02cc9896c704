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
import json
import math
import os

import torch

from .. import linear_token_logprobs
from .data import WSPODataCollator
from .model_io import lm_head_inputs
from .precompute import NonFiniteLogpsError, length_batches

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


@torch.inference_mode()
def sequence_logps(model, rows, *, pad_token_id=0, batch_tokens=DEFAULT_BATCH_TOKENS, backend=None,
                   autocast_dtype=None, progress=None, name="the model"):
    """(sum of the response tokens' logps [N] float64, response token count [N]) of tokenised rows
    ({"input_ids", "labels"}, prompt labels -100).  A non-finite sum (NaN / inf weights, an overflow) is
    refused, naming ``name``: a NaN margin would count as a loss and pass for a result."""
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
        bad = int((~torch.isfinite(sums[index])).sum())
        if bad:
            raise NonFiniteLogpsError(f"{name} gives non-finite logps for {bad} of {len(batch_rows)} rows: its weights "
                                      "hold NaN / inf, or it overflows in this dtype")
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


def _rate(hits, ties):
    n, k = hits.numel(), int(hits.sum())
    return {"rate": k / n if n else None, "ci95": list(wilson_interval(k, n)), "ties": int(ties.sum())}


def _mean_se(x):
    """Mean and its standard error (pairs are independent draws)."""
    n = x.numel()
    return x.mean().item(), (x.std().item() / math.sqrt(n) if n > 1 else float("inf"))


def model_summary(scores):
    margin = scores["chosen"] - scores["rejected"]
    per_token = (scores["chosen"] / scores["chosen_tokens"].clamp_min(1)
                 - scores["rejected"] / scores["rejected_tokens"].clamp_min(1))
    return {"margin": margin.mean().item(), "margin_per_token": per_token.mean().item(),
            "win": _rate(margin > 0, margin == 0)}


def reward_summary(a, b):
    """The implicit reward of model a over model b (see the module docstring); a tie (R = 0, e.g. a
    checkpoint equal to the reference) is not a correct ranking, and is counted."""
    reward = (a["chosen"] - b["chosen"]) - (a["rejected"] - b["rejected"])
    gain, se = _mean_se(reward)
    return {"gain": gain, "gain_se": se, "accuracy": _rate(reward > 0, reward == 0)}


def amplification(strong, weak):
    """G_s / G_w, or None with the reason when the weak pair's gain is not clearly positive (within two
    standard errors of 0, or below): a ratio of noise, or of two losses, says nothing of a transfer."""
    if not weak["gain"] > 2 * weak["gain_se"]:
        return None, "the weak pair's gain is not above 0 by two standard errors"
    return strong["gain"] / weak["gain"], None


def summarize(scores, *, transfers, gammas=None):
    """The report: every model's margins and win rate, the implicit reward of each weak pair and of each
    policy over its reference, and each policy's transfer (gains, amplification, the 1/gamma it aims at).

    ``scores``: {name: score_pairs(...)}; ``transfers``: {policy: (reference, weak aligned, weak base)},
    the models each policy was trained from; ``gammas``: {policy: gamma}.
    """
    gammas = gammas or {}
    n = len(next(iter(scores.values()))["chosen"])
    report = {"pairs": n, "models": {name: model_summary(s) for name, s in scores.items()}, "rewards": {},
              "transfer": {}}
    for policy, (reference, aligned, base) in transfers.items():
        weak_key, strong_key = f"{aligned} vs {base}", f"{policy} vs {reference}"
        if weak_key not in report["rewards"]:
            report["rewards"][weak_key] = reward_summary(scores[aligned], scores[base])
        report["rewards"][strong_key] = reward_summary(scores[policy], scores[reference])
        weak, strong = report["rewards"][weak_key], report["rewards"][strong_key]
        ratio, why = amplification(strong, weak)
        gamma = gammas.get(policy)
        report["transfer"][policy] = {"weak_pair": weak_key, "weak_gain": weak["gain"], "strong_gain": strong["gain"],
                                      "amplification": ratio, "no_amplification_because": why, "gamma": gamma,
                                      "expected_amplification": 1 / gamma if gamma else None}
    return report


def _pct(rate):
    lo, hi = rate["ci95"]
    ties = f", {rate['ties']} ties" if rate["ties"] else ""
    return f"{rate['rate']:.1%} [{lo:.1%}, {hi:.1%}]{ties}"


def format_table(report):
    """The report as Markdown tables (what ``wspo-kernels eval`` prints)."""
    n = report["pairs"]
    out = [f"{n} held-out pairs; margin = log p(chosen) - log p(rejected); win = margin > 0 (95% Wilson interval)", "",
           "| model | margin (nats) | margin per token | win rate |", "|---|---|---|---|"]
    for name, m in report["models"].items():
        out.append(f"| {name} | {m['margin']:+.3f} | {m['margin_per_token']:+.4f} | {_pct(m['win'])} |")
    if report["rewards"]:
        out += ["", "| implicit reward (log-ratio) | mean gain (nats, +- s.e.) | accuracy |", "|---|---|---|"]
        for name, r in report["rewards"].items():
            out.append(f"| {name} | {r['gain']:+.3f} +- {r['gain_se']:.3f} | {_pct(r['accuracy'])} |")
    if report["transfer"]:
        out += ["", "| policy | weak gain | strong gain | amplification | expected (1/gamma) |", "|---|---|---|---|---|"]
        for name, t in report["transfer"].items():
            expected = f"{t['expected_amplification']:.2f}" if t["expected_amplification"] else "-"
            ratio = f"{t['amplification']:.2f}" if t["amplification"] is not None else f"- ({t['no_amplification_because']})"
            out.append(f"| {name} | {t['weak_gain']:+.3f} | {t['strong_gain']:+.3f} | {ratio} | {expected} |")
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
    rates = [m["win"]["rate"] or 0.0 for m in models]
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


def _finite(value):
    """NaN / inf -> None: the JSON stays standard (jq, JavaScript)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_report(report, out_dir, *, log=print):
    """Table to ``log``, ``wspo_eval.json`` and ``wspo_eval.png`` into ``out_dir``."""
    from . import storage
    os.makedirs(out_dir, exist_ok=True)
    log(format_table(report))
    storage.write_json_atomically(os.path.join(out_dir, "wspo_eval.json"), _finite(report))
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

    from .cli import _snapshot_dir
    folder = _snapshot_dir(path)  # a Hub id: its local snapshot
    if folder is None or not any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(folder)


def check_same_tokenizer(tokenizer, models, log):
    """WSPO compares the models token by token: a model shipped with another vocabulary is refused; one
    shipped without a tokenizer is named (it cannot be checked)."""
    from .config import ConfigError
    vocab = tokenizer.get_vocab()
    unchecked = []
    for name, path, _ in models:
        other = _tokenizer_of(path)
        if other is None:
            unchecked.append(name)
        elif other.get_vocab() != vocab:
            raise ConfigError(f"{name} ({path}) has another tokenizer than model_name_or_path ({len(other.get_vocab())} "
                              f"vs {len(vocab)} tokens, or other ids): WSPO compares the models token by token")
    if unchecked:
        log(f"no tokenizer shipped with {', '.join(unchecked)}: assumed to be model_name_or_path's")


def _saved_policy(path):
    """'lora', 'full' or None: what a run's output_dir (or a checkpoint) holds."""
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "lora"
    weights = any(f.endswith((".safetensors", ".bin")) and not f.startswith("training_args") for f in os.listdir(path))
    return "full" if os.path.isfile(os.path.join(path, "config.json")) and weights else None


def _run_record(path):
    from .cli import RUN_RECORD
    from .storage import read_json
    record = read_json(os.path.join(path, RUN_RECORD)) if os.path.isdir(path) else None
    return record if isinstance(record, dict) else {}


def _unique(names):
    """Names made unique by the path they came from (two runs' basenames can match)."""
    seen = {}
    for name, path in names:
        seen.setdefault(name, []).append(path)
    return [(name if len(seen[name]) == 1 else f"{name} ({os.path.relpath(path)})", path) for name, path in names]


def models_to_score(config, log):
    """([(name, path, kind)], {policy: (reference, weak aligned, weak base) names}, {policy: gamma}).

    The config's frozen models; then every policy: this run's checkpoints (``eval_checkpoints``), its final
    model, other runs' (``eval_runs``).  Each policy is compared with the frozen models *its* run was
    trained from (``wspo_run.json``; the config's when the run did not record them): a weak-model sweep
    adds each run's weak pair."""
    from .checkpoints import checkpoint_dirs, why_incomplete
    from .config import ConfigError
    w, out = config.wspo, config.training.output_dir
    given = {"ref": w.ref_model or w.model_name_or_path, "weak_aligned": w.weak_aligned_model,
             "weak_base": w.weak_base_model}
    frozen = {}  # path -> name

    def frozen_name(role, path):
        label = {"ref": "strong reference", "weak_aligned": "weak aligned", "weak_base": "weak base"}[role]
        key = os.path.abspath(path) if os.path.isdir(path) else path
        if key not in frozen:
            taken = set(frozen.values())
            frozen[key] = label if label not in taken else f"{label} ({os.path.basename(os.path.normpath(path))})"
        return frozen[key]
    for role in ("weak_base", "weak_aligned", "ref"):  # the table's order
        frozen_name(role, given[role])
    this = _run_record(out)
    policies = []  # (name, path, record)
    if w.eval_checkpoints:
        if w.eval_checkpoints.strip() == "all":
            found = [p for _, p in sorted(checkpoint_dirs(out)) if why_incomplete(p) is None]
        else:
            found = [p if os.path.isabs(p) or not os.path.isdir(os.path.join(out, p)) else os.path.join(out, p)
                     for p in (x.strip() for x in w.eval_checkpoints.split(",")) if p]
        for p in found:
            if _saved_policy(p) is None:
                if w.eval_checkpoints.strip() != "all":
                    raise ConfigError(f"eval_checkpoints: {p!r} holds no model (weights and config.json, or adapters)")
                log(f"{p} holds no loadable model (e.g. ZeRO-3 shards without 16-bit weights): skipped")
                continue
            policies.append((os.path.basename(os.path.normpath(p)), p, this))
    if _saved_policy(out):
        policies.append(("policy", out, this))
    else:
        log(f"{out} holds no trained model (yet): scoring the frozen models" + (" and checkpoints" if policies else ""))
    for run in (r.strip() for r in (w.eval_runs or "").split(",") if r.strip()):
        if _saved_policy(run) is None:
            raise ConfigError(f"eval_runs: {run!r} holds no trained model (a finished run's output_dir)")
        policies.append((f"policy {os.path.basename(os.path.normpath(run))}", run, _run_record(run)))
    named = _unique([(n, p) for n, p, _ in policies])
    transfers, gammas = {}, {}
    for (name, path), (_, _, record) in zip(named, policies):
        roles = {role: record.get(key) or given[role] for role, key in
                 (("ref", "ref_model"), ("weak_aligned", "weak_aligned_model"), ("weak_base", "weak_base_model"))}
        if not record.get("ref_model") and record.get("model_name_or_path"):
            roles["ref"] = record["model_name_or_path"]  # the run's reference: its initial weights
        transfers[name] = tuple(frozen_name(r, roles[r]) for r in ("ref", "weak_aligned", "weak_base"))
        gammas[name] = record.get("pref_beta") or (w.pref_beta if record is this else None)
    models = [(name, path, "full") for path, name in frozen.items()]
    models += [(name, path, _saved_policy(path)) for name, path in named]
    return models, transfers, gammas


def _load(path, kind, bases, dtype, device):
    """A model to score: a full checkpoint, or LoRA adapters over the first base that exists of
    ``bases`` (the adapters' recorded base, the run's, the config's)."""
    from .cli import _load_model, _local, _snapshot_dir
    from .config import ConfigError
    if kind != "lora":
        return _load_model(path, dtype).to(device)
    from peft import PeftModel

    from .storage import read_json
    recorded = (read_json(os.path.join(path, "adapter_config.json")) or {}).get("base_model_name_or_path")
    base = next((b for b in (recorded, *bases) if b and _snapshot_dir(_local(b)) is not None), None)
    if base is None:
        raise ConfigError(f"the LoRA adapters in {path} need their base model; none of {[recorded, *bases]} is here")
    return PeftModel.from_pretrained(_load_model(_local(base), dtype), path).to(device)


def _config_from_run(argv):
    """``wspo-kernels eval RUN_DIR [key=value ...]``: a finished run's output_dir stands for its config (the
    models, numerics and cut it recorded in ``wspo_run.json``)."""
    from .cli import RUN_RECORD
    from .config import ConfigError
    if not argv or not os.path.isdir(argv[0]):
        return argv
    record = _run_record(argv[0])
    if not record:
        raise ConfigError(f"{argv[0]!r} is a directory without {RUN_RECORD} (a finished run's output_dir), not a config")
    keys = ("model_name_or_path", "ref_model", "weak_aligned_model", "weak_base_model", "pref_beta", "bf16", "fp16",
            "cutoff_len", "truncation", "template")
    return [f"{k}={record[k]}" for k in keys if record.get(k) is not None] + [f"output_dir={argv[0]}"] + list(argv[1:])


def _overlap(w, pairs_path, log):
    """Eval prompts that also prompt a training row (by their text): their margins are not held out."""
    from .formats import prompt_response, read_records
    if not os.path.exists(w.dataset):
        log(f"warning: dataset {w.dataset!r} not found: the overlap with the training data is not checked")
        return

    def prompts(path):
        return [json.dumps(prompt_response(r, i)[0], sort_keys=True) for i, r in enumerate(read_records(path))]
    try:
        seen = set(prompts(w.dataset))
    except ValueError as e:
        log(f"warning: dataset {w.dataset!r} unreadable ({e}): the overlap with the training data is not checked")
        return
    held = prompts(pairs_path)
    overlap = sum(p in seen for p in held)
    if overlap:
        log(f"warning: {overlap} of {len(held)} eval prompts also prompt the training data ({w.dataset}): their "
            "margins are not held out")


def main(argv):
    """``wspo-kernels eval CONFIG.yaml|RUN_DIR [key=value ...]``: the report for the run in ``output_dir``."""
    import time

    from transformers import AutoTokenizer
    from tqdm.auto import tqdm

    from .cli import _dtype, _local, _say, effective_cutoff
    from .config import EVAL_REQUIRED, ConfigError, parse_config
    argv = [argv] if isinstance(argv, str) else list(argv)
    config = parse_config(_config_from_run(argv), prog="wspo-kernels eval", required=EVAL_REQUIRED,
                          paths=("eval_dataset",))
    w, args = config.wspo, config.training
    cutoff = effective_cutoff(w)
    tokenizer = AutoTokenizer.from_pretrained(_local(w.model_name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    models, transfers, gammas = models_to_score(config, _say)
    check_same_tokenizer(tokenizer, [(n, _local(p), k) for n, p, k in models], _say)
    pairs, dropped = read_pairs(w.eval_dataset, tokenizer, cutoff, truncation=w.truncation, template=w.template)
    _say(f"{len(pairs)} pairs from {w.eval_dataset}" + (f"; {dropped} dropped (no response token within {cutoff} "
                                                         "tokens)" if dropped else ""))
    if w.dataset:
        _overlap(w, w.eval_dataset, _say)
    dtype = _dtype(args)
    autocast = None if dtype == torch.float32 else dtype
    device = "cpu" if args.use_cpu or not torch.cuda.is_available() else "cuda"
    bases = [r.get("model_name_or_path") for r in (_run_record(p) for _, p, _ in models)] + [w.model_name_or_path]
    tokens = sum(len(p[h]["input_ids"]) for p in pairs for h in ("chosen", "rejected"))
    scores, speed = {}, {}
    for name, path, kind in models:  # one model resident at a time
        try:
            model = _load(_local(path), kind, [b for b in bases if b], dtype, device)
        except (OSError, ValueError, ImportError) as e:
            raise ConfigError(f"cannot load {name} from {path}: {str(e).splitlines()[0]}") from None
        with tqdm(total=2 * len(pairs), desc=f"eval {name}", unit="row") as bar:
            start = time.perf_counter()
            try:
                scores[name] = score_pairs(model, pairs, pad_token_id=tokenizer.pad_token_id, backend=w.backend,
                                           batch_tokens=w.eval_batch_tokens, autocast_dtype=autocast, progress=bar,
                                           name=f"{name} ({path})")
            except NotImplementedError as e:  # a head the fused loss does not cover (soft-capped, scaled logits)
                raise ConfigError(f"{name} ({path}): {e}") from None
            except ValueError as e:  # e.g. rows longer than this model's context (set cutoff_len)
                if isinstance(e, NonFiniteLogpsError):
                    raise
                raise ConfigError(f"{name} ({path}): {str(e).splitlines()[0]}") from None
            speed[name] = tokens / (time.perf_counter() - start)
        del model
    report = summarize(scores, transfers=transfers, gammas=gammas)
    for name, path, _ in models:
        report["models"][name].update(path=os.path.abspath(_local(path)) if os.path.isdir(_local(path)) else path,
                                      tokens_per_second=speed[name])
    report.update(eval_dataset=os.path.abspath(w.eval_dataset), dropped_pairs=dropped,
                  numerics=f"{dtype}" + (f" under autocast {autocast}" if autocast else ""))
    json_path, png = write_report(report, args.output_dir, log=print)
    _say(f"report -> {json_path}" + (f", {png}" if png else ""))
    return report
