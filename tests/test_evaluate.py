"""``wspo-kernels eval`` and ``train.evaluate``: margins exact against float64, a pair set whose answer is
known, the CLI on a finished run (full and LoRA), sweeps from one precompute, bad inputs."""
import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("yaml")

from train_fixtures import VOCAB, save_tiny_checkpoints, tiny, words, write_config  # noqa: E402

from wspo_kernels.__main__ import main as wspo_main  # noqa: E402
from wspo_kernels.train import cli, evaluate  # noqa: E402
from wspo_kernels.train.config import ConfigError  # noqa: E402
from wspo_kernels.train.data import build_example  # noqa: E402


def _pairs(n, seed=0):
    """Chosen: even tokens, rejected: odd ones (a preference a model can learn and carry to new pairs);
    prompts and answers of varied length."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(4, VOCAB, (2 + i % 4,), generator=g).tolist()
        good = (2 * torch.randint(2, VOCAB // 2, (2 + i % 3,), generator=g)).tolist()
        bad = (2 * torch.randint(2, VOCAB // 2 - 1, (len(good),), generator=g) + 1).tolist()
        out.append({"chosen": build_example(prompt, good + [2], paired_len=len(bad) + 1),
                    "rejected": build_example(prompt, bad + [2], paired_len=len(good) + 1)})
    return out


def _float64_sums(model, rows):
    model = model.double()
    out = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        labels = torch.tensor(row["labels"][1:])
        keep = labels != -100
        out.append(logp[keep].gather(-1, labels[keep][:, None]).sum().item())
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("batch_tokens", [1, 24, 10_000])
def test_margins_are_exact_against_float64(batch_tokens):
    """Any batching (one row per forward, a few, all at once): the fp32 fused path within fp32 rounding of
    a float64 log_softmax, row by row, in the dataset's order."""
    model, pairs = tiny(5), _pairs(9)
    scores = evaluate.score_pairs(model, pairs, batch_tokens=batch_tokens)
    want_c = _float64_sums(tiny(5), [p["chosen"] for p in pairs])
    want_r = _float64_sums(tiny(5), [p["rejected"] for p in pairs])
    worst = max((scores["chosen"] - want_c).abs().max().item(), (scores["rejected"] - want_r).abs().max().item())
    assert worst < 1e-4, f"worst sequence logp error {worst}"
    assert scores["chosen_tokens"].tolist() == [len(p["chosen"]["input_ids"]) - sum(y == -100 for y in
                                                p["chosen"]["labels"]) for p in pairs]
    report = evaluate.summarize({"a": scores}, transfers={})
    margin = (want_c - want_r).mean().item()
    assert math.isclose(report["models"]["a"]["margin"], margin, abs_tol=1e-4)


def test_wilson_interval_and_length_batches():
    assert evaluate.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert evaluate.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert evaluate.wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    lengths = [5, 30, 7, 7, 12, 3, 40]
    batches = evaluate.length_batches(lengths, 32)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) == 1 or lengths[b[0]] * len(b) <= 32 for b in batches)
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)


def test_a_model_trained_to_prefer_chosen_wins():
    """SFT on the chosen halves: the trained model wins nearly every pair, its implicit reward over its
    starting point ranks chosen above rejected nearly always; the untrained model is near chance."""
    from wspo_kernels.train.data import WSPODataCollator
    held = _pairs(40, seed=2)
    base = tiny(3)
    model = tiny(3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(60):  # fresh pairs every step: the preference, not the rows, is learnt
        batch = WSPODataCollator(0)([p["chosen"] for p in _pairs(32, seed=100 + step)])
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = {"base": evaluate.score_pairs(base, held), "trained": evaluate.score_pairs(model, held)}
    report = evaluate.summarize(scores, transfers={})
    assert report["models"]["trained"]["win"]["rate"] >= 0.95
    assert 0.15 <= report["models"]["base"]["win"]["rate"] <= 0.85
    reward = evaluate.reward_summary(scores["trained"], scores["base"])
    assert reward["accuracy"]["rate"] >= 0.95 and reward["gain"] > 2 * reward["gain_se"]


def _synthetic(chosen, rejected):
    n = len(chosen)
    return {"chosen": torch.tensor(chosen, dtype=torch.float64), "rejected": torch.tensor(rejected, dtype=torch.float64),
            "chosen_tokens": torch.full((n,), 4), "rejected_tokens": torch.full((n,), 2)}


def test_transfer_ratio_ties_and_a_weak_pair_that_did_not_learn():
    """Hand-made scores: the weak pair gains 2 nats per pair (+-0.5), the policy 8: amplification 4 = 1/0.25.
    A policy equal to its reference ties on every pair (accuracy 0, all ties).  A weak pair whose gain is
    negative or noise gives no ratio (a ratio of two losses would read as a success)."""
    noise = [0.5, -0.5, 0.25, -0.25]
    base = _synthetic([-10.0] * 4, [-9.0] * 4)
    aligned = _synthetic([-8.0 + e for e in noise], [-9.0] * 4)
    reference = _synthetic([-12.0] * 4, [-11.0] * 4)
    policy = _synthetic([-4.0 + 4 * e for e in noise], [-11.0] * 4)
    worse = _synthetic([-12.0 + e for e in noise], [-9.0] * 4)  # "aligned" away from the preference
    scores = {"weak base": base, "weak aligned": aligned, "worse aligned": worse, "strong reference": reference,
              "policy": policy, "unchanged": reference, "from worse": policy}
    report = evaluate.summarize(scores, gammas={"policy": 0.25}, transfers={
        "policy": ("strong reference", "weak aligned", "weak base"),
        "unchanged": ("strong reference", "weak aligned", "weak base"),
        "from worse": ("strong reference", "worse aligned", "weak base")})
    t = report["transfer"]["policy"]
    assert (t["weak_gain"], t["strong_gain"], t["amplification"], t["expected_amplification"]) == (2.0, 8.0, 4.0, 4.0)
    unchanged = report["rewards"]["unchanged vs strong reference"]
    assert unchanged["accuracy"]["rate"] == 0.0 and unchanged["accuracy"]["ties"] == 4 and unchanged["gain"] == 0.0
    assert report["transfer"]["from worse"]["amplification"] is None
    assert "not above 0" in report["transfer"]["from worse"]["no_amplification_because"]
    assert report["models"]["weak base"]["margin"] == -1.0 and report["models"]["weak base"]["margin_per_token"] == 2.0
    assert "4 ties" in evaluate.format_table(report)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"))


def _pair_file(path, n=10, start=0):
    path.write_text("\n".join(json.dumps({"prompt": words(3, i), "chosen": words(2, 5 * i), "rejected": words(3, 7 * i)})
                              for i in range(start, start + n)) + "\n")
    return str(path)


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_eval_on_a_finished_run(tmp_path, ckpt, capsys, finetuning):
    """The CLI scores the four models (the policy from output_dir: a full model or LoRA adapters) and
    every checkpoint, prints the table, writes JSON and a plot; the policy's numbers are those of the
    model the run saved."""
    paths, data = ckpt
    pairs = _pair_file(tmp_path / "pairs.jsonl")
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", "save_strategy: steps", "save_steps: 1",
                          f"finetuning_type: {finetuning}", "learning_rate: 1.0e-2", "warmup_ratio: 0.0")
    trainer = cli.train_main([config])
    capsys.readouterr()
    assert wspo_main(["eval", config, f"eval_dataset={pairs}", "eval_checkpoints=all"]) == 0
    out = capsys.readouterr().out
    for name in ("weak base", "weak aligned", "strong reference", "checkpoint-1", "checkpoint-2", "policy"):
        assert f"| {name} |" in out
    assert "| policy vs strong reference |" in out and "| weak aligned vs weak base |" in out
    report = json.loads((tmp_path / "out" / "wspo_eval.json").read_text())
    assert os.path.exists(tmp_path / "out" / "wspo_eval.png") and report["pairs"] == 10
    assert report["transfer"]["policy"]["expected_amplification"] == pytest.approx(10.0)  # 1 / pref_beta
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths["policy"])
    held, _ = evaluate.read_pairs(pairs, tokenizer, 8)
    direct = evaluate.score_pairs(trainer.model.eval(), held)
    margin = (direct["chosen"] - direct["rejected"]).mean().item()
    assert report["models"]["policy"]["margin"] == pytest.approx(margin, abs=1e-5)
    assert report["models"]["checkpoint-2"]["margin"] == pytest.approx(margin, abs=1e-5)  # the last checkpoint


def test_gamma_and_weak_model_sweeps_share_one_precompute(tmp_path, ckpt, capsys, monkeypatch):
    """Runs with other pref_beta share precompute_dir and load no frozen model again; a run with another
    weak-aligned model loads and runs only that one; eval tabulates the runs side by side, each with its
    gamma."""
    paths, data = ckpt
    shared = tmp_path / "precomputed"
    loads = []
    real = cli._load_model
    monkeypatch.setattr(cli, "_load_model", lambda name, dtype: loads.append(os.path.basename(name)) or real(name, dtype))
    configs = {}
    for gamma in (0.1, 0.5):
        configs[gamma] = write_config(tmp_path / f"c{gamma}.yaml", paths, data, tmp_path / f"g{gamma}",
                                      f"pref_beta: {gamma}", f"precompute_dir: {shared}")
        cli.train_main([configs[gamma]])
    assert sorted(loads) == ["policy", "policy", "policy", "weak_aligned", "weak_base"]  # frozen models once
    first = datasets.load_from_disk(str(shared / "dataset"))
    other = str(tmp_path / "weak_aligned_b")
    tiny(9).save_pretrained(other)
    loads.clear()
    capsys.readouterr()
    cli.precompute_main([configs[0.1], f"weak_aligned_model={other}"])
    assert loads == ["weak_aligned_b"] and "reusing the ref, weak_base logps" in capsys.readouterr().out
    second = datasets.load_from_disk(str(shared / "dataset"))
    assert second["ref_logps"] == first["ref_logps"] and second["weak_base_logps"] == first["weak_base_logps"]
    assert second["weak_aligned_logps"] != first["weak_aligned_logps"]
    pairs = _pair_file(tmp_path / "pairs.jsonl")
    report = evaluate.main([configs[0.1], f"eval_dataset={pairs}", f"eval_runs={tmp_path / 'g0.5'}"])
    assert report["transfer"]["policy"]["gamma"] == 0.1 and report["transfer"]["policy g0.5"]["gamma"] == 0.5


def test_bad_eval_inputs_are_clear(tmp_path, ckpt, capsys):
    paths, data = ckpt
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out")
    unpaired = tmp_path / "sft.jsonl"
    unpaired.write_text(json.dumps({"prompt": words(2), "response": words(2)}) + "\n")
    assert wspo_main(["eval", config, f"eval_dataset={unpaired}"]) == 2
    assert "row 0 has no rejected response" in capsys.readouterr().err
    assert wspo_main(["eval", config]) == 2
    assert "missing eval_dataset" in capsys.readouterr().err
    pairs = _pair_file(tmp_path / "pairs.jsonl")
    other = tmp_path / "other_tok"
    save_tiny_checkpoints(other)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "x": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(other / "weak_base"))
    assert wspo_main(["eval", config, f"eval_dataset={pairs}", f"weak_base_model={other / 'weak_base'}"]) == 2
    assert "weak base (" in (err := capsys.readouterr().err) and "has another tokenizer" in err
    with pytest.raises(ConfigError, match="eval_runs|holds no trained model"):
        evaluate.main([config, f"eval_dataset={pairs}", f"eval_runs={tmp_path}"])
    overlap = tmp_path / "overlap.jsonl"  # 3 of the training file's prompts (other answers) and a new one
    rows = [json.loads(line) for line in open(data)]
    overlap.write_text("\n".join(json.dumps({"prompt": p, "chosen": words(2), "rejected": words(3, 9)})
                                 for p in [r["prompt"] for r in rows[:3]] + [words(5, 30)]))
    capsys.readouterr()
    evaluate.main([config, f"eval_dataset={overlap}"])
    assert "warning: 3 of 4 eval prompts also prompt the training data" in capsys.readouterr().out
    evaluate.main([config, f"eval_dataset={overlap}", f"dataset={tmp_path / 'gone.jsonl'}"])  # only a warning
    assert "gone.jsonl' not found: the overlap with the training data is not checked" in capsys.readouterr().out


def test_eval_of_a_weak_model_sweep_compares_each_run_with_its_own_weak_pair(tmp_path, ckpt):
    """Two runs trained from different weak-aligned models, both in directories named `out`: eval, given
    the first run's directory for its config, scores both weak-aligned models, names the runs apart, and
    measures each run's transfer against the weak pair it was trained from."""
    paths, data = ckpt
    other = str(tmp_path / "weak_aligned_b")
    tiny(9).save_pretrained(other)
    transformers.AutoTokenizer.from_pretrained(paths["policy"]).save_pretrained(other)
    runs = {}
    for name, extra in (("a", ()), ("b", (f"weak_aligned_model: {other}", "pref_beta: 0.5"))):
        runs[name] = tmp_path / name / "out"
        cli.train_main([write_config(tmp_path / f"{name}.yaml", paths, data, runs[name], *extra)])
    pairs = _pair_file(tmp_path / "pairs.jsonl")
    # Both runs as eval_runs: two policies named after a directory `out`, told apart by their paths.
    report = evaluate.main([str(runs["a"]), f"eval_dataset={pairs}", f"eval_runs={runs['a']},{runs['b']}",
                            "use_cpu=true"])
    named = {r: f"policy out ({os.path.relpath(runs[r])})" for r in runs}
    assert set(report["models"]) == {"weak base", "weak aligned", "strong reference", "weak aligned (weak_aligned_b)",
                                     "policy", *named.values()}
    assert report["models"]["policy"]["margin"] == report["models"][named["a"]]["margin"]
    b = report["transfer"][named["b"]]
    assert b["weak_pair"] == "weak aligned (weak_aligned_b) vs weak base" and b["gamma"] == 0.5
    assert report["transfer"]["policy"]["weak_pair"] == "weak aligned vs weak base"
    assert report["transfer"]["policy"]["gamma"] == 0.1  # from the run's record, not a default
    assert report["numerics"] == "torch.float32"  # the run's bf16: false, from its record


def test_a_nan_model_is_one_line_exit_1(tmp_path, ckpt, capsys):
    paths, data = ckpt
    nan = str(tmp_path / "nan_base")
    model = tiny(3)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    model.save_pretrained(nan)
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", f"weak_base_model: {nan}")
    assert wspo_main(["eval", config, f"eval_dataset={_pair_file(tmp_path / 'p.jsonl')}"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wspo-kernels eval")]
    assert len(err) == 1 and "weak base" in err[0] and "gives non-finite logps for" in err[0]


def test_cache_reuse_runs_nothing_when_every_column_is_held_and_never_across_versions(tmp_path, monkeypatch):
    from wspo_kernels.train import precompute as pre
    from train_fixtures import examples
    ds = datasets.Dataset.from_list(examples(6))
    frozen = dict(ref_model=tiny(1), weak_aligned_model=tiny(2), weak_base_model=tiny(3))
    ids = {"ref": "r", "weak_aligned": "a", "weak_base": "b"}
    first = pre.precompute_logps(ds, **frozen, output_dir=str(tmp_path), model_ids=ids, shard_size=4, progress=False)
    # Another shard size: not the same cache, but every column is held -> no model is needed or run.
    assert pre.cached_roles(ds, str(tmp_path), model_ids=ids, shard_size=2) == set(ids)
    again = pre.precompute_logps(ds, output_dir=str(tmp_path), model_ids=ids, shard_size=2, progress=False)
    assert again["ref_logps"] == first["ref_logps"] and again["weak_base_logps"] == first["weak_base_logps"]
    monkeypatch.setattr("wspo_kernels.__version__", "99.0")  # an upgrade: its logps are not reused
    assert pre.cached_roles(ds, str(tmp_path), model_ids=ids, shard_size=2) == set()
    with pytest.raises(pre.CacheChanged):
        pre.precompute_logps(ds, output_dir=str(tmp_path), model_ids=ids, shard_size=2, progress=False)
