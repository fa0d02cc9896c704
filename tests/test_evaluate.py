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
    report = evaluate.summarize({"a": scores, "b": evaluate.score_pairs(tiny(6), pairs)}, policies=[])
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
    report = evaluate.summarize(scores, policies=["trained"], reference="base", weak=("trained", "base"))
    assert report["models"]["trained"]["win"]["rate"] >= 0.95
    assert report["rewards"]["trained vs base"]["accuracy"]["rate"] >= 0.95
    assert 0.15 <= report["models"]["base"]["win"]["rate"] <= 0.85
    assert report["transfer"]["trained"]["amplification"] == pytest.approx(1.0)  # the same pair both ways


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
    assert "weak_base_model" in (err := capsys.readouterr().err) and "another tokenizer" in err
    with pytest.raises(ConfigError, match="eval_runs|holds no trained model"):
        evaluate.main([config, f"eval_dataset={pairs}", f"eval_runs={tmp_path}"])
    overlap = tmp_path / "overlap.jsonl"  # the training file's rows, with a rejected answer added
    rows = [json.loads(line) for line in open(data)]
    overlap.write_text("\n".join(json.dumps(dict(r, chosen=r.pop("response"), rejected=words(2))) for r in rows[:4]))
    capsys.readouterr()
    evaluate.main([config, f"eval_dataset={overlap}"])
    assert "warning: 4 of 4 eval pairs also appear in the training data" in capsys.readouterr().out
