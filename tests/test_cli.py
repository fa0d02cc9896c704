"""``wspo-kernels train`` / ``precompute``: the official recipe's YAML, config validation, data formats,
truncation, the fingerprinted logps cache, resuming; on tiny local checkpoints (nothing downloaded)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("yaml")

from train_fixtures import VOCAB, save_tiny_checkpoints, tiny, words, write_config  # noqa: E402

from wspo_kernels.__main__ import main as wspo_main  # noqa: E402
from wspo_kernels.train import cli  # noqa: E402
from wspo_kernels.train.config import ConfigError, parse_config  # noqa: E402
from wspo_kernels.train.data import build_example, encode_prompt_response, infer_seqlen  # noqa: E402
from wspo_kernels.train.formats import prompt_response, read_records  # noqa: E402

# The official recipe, verbatim (examples/train_full/qwen2_full_wspo_ds3.yaml), models and data to be substituted.
OFFICIAL_YAML = """\
### model
model_name_or_path: {policy}
weak_base_model:  {weak_base}
weak_aligned_model: {weak_aligned}

### method
stage: wspo
do_train: true
finetuning_type: full
deepspeed: examples/deepspeed/ds_z3_offload_config.json

pref_beta: 0.1
pref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]
### dataset
dataset: {dataset}
template: default
cutoff_len: 4096
max_samples: 268694
overwrite_cache: true
preprocessing_num_workers: 16


### output
output_dir: {output_dir}
logging_steps: 10
save_steps: 1000
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 4
learning_rate: 1.0e-5
num_train_epochs: 1
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
val_size: 0.001
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 1000
"""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"))


# ---------------------------------------------------------------- 6. the official recipe's YAML runs unchanged
def test_official_yaml_runs_with_local_models_and_preference_data(tmp_path, ckpt, capsys):
    paths, _ = ckpt
    data = tmp_path / "ultrafeedback.json"  # the official dataset's format: instruction / chosen / rejected
    rows = [{"instruction": words(3, i), "chosen": words(1 + i % 3, 7 * i), "rejected": words(2, i)} for i in range(10)]
    data.write_text(json.dumps(rows, indent=2))
    config = tmp_path / "qwen2_full_wspo_ds3.yaml"
    config.write_text(OFFICIAL_YAML.format(dataset=data, output_dir=tmp_path / "out", **paths))
    with pytest.raises(ConfigError, match="deepspeed: config file .* not found"):  # at once, nothing loaded
        parse_config([str(config)])
    trainer = cli.train_main([str(config), "deepspeed=", "max_steps=2", "use_cpu=true", "eval_steps=1",
                              "logging_steps=1"])
    out = capsys.readouterr().out
    assert "10 examples" in out and f"saved to {tmp_path / 'out'}" in out
    logged = trainer.state.log_history
    assert any("eval_loss" in h for h in logged) and any("rewards/chosen" in h for h in logged)
    assert len(trainer.eval_dataset) == 1 and len(trainer.train_dataset) == 9  # val_size 0.001 of 10 rows
    assert os.path.exists(tmp_path / "out" / "training_loss.png")  # plot_loss
    assert os.path.exists(tmp_path / "out" / "model.safetensors")  # saved where the official trainer saves


def test_defaults_are_the_official_recipes(tmp_path, ckpt):
    paths, data = ckpt
    c = parse_config([f"model_name_or_path={paths['policy']}", f"weak_aligned_model={paths['weak_aligned']}",
                      f"weak_base_model={paths['weak_base']}", f"dataset={data}", f"output_dir={tmp_path}"])
    t, w = c.training, c.wspo
    assert (t.learning_rate, t.num_train_epochs, t.per_device_train_batch_size, t.gradient_accumulation_steps,
            t.logging_steps, t.save_steps, t.bf16, str(t.lr_scheduler_type).split(".")[-1].lower()) == \
        (1e-5, 1.0, 1, 4, 10, 1000, True, "cosine")
    assert (w.pref_beta, w.cutoff_len, w.truncation, w.finetuning_type) == (0.1, 4096, "infer_seqlen", "full")
    warmup = getattr(t, "warmup_ratio", None) or t.warmup_steps
    assert warmup == 0.1


# ---------------------------------------------------------------- 7. a command-line tool
def test_help_lists_every_key_with_its_default(capsys):
    assert wspo_main(["precompute", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    for key in ("--pref_beta", "--cutoff_len", "--truncation", "--lora_target", "--learning_rate", "--save_steps"):
        assert key in text
    assert "(default: 1e-05)" in text and "(default: 4096)" in text
    out = subprocess.run([sys.executable, "-m", "wspo_kernels", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--weak_aligned_model" in out.stdout


def test_train_without_config_says_what_is_missing(capsys):
    assert wspo_main(["train"]) == 2
    usage, error = capsys.readouterr().err.splitlines()  # like argparse: the usage line, then the error
    assert usage == "usage: wspo-kernels train [-h] CONFIG [key=value ...]"
    assert error.startswith("wspo-kernels train: error: missing model_name_or_path, weak_aligned_model, "
                            "weak_base_model, dataset, output_dir")


def test_command_line_overrides(tmp_path, ckpt):
    paths, data = ckpt
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out")
    c = parse_config([config, "--max_steps", "7", "learning_rate=3e-4", "--bf16=false", "--gamma", "0.25",
                      "--disable_dropout"])
    assert (c.training.max_steps, c.training.learning_rate, c.training.bf16, c.wspo.pref_beta,
            c.wspo.disable_dropout) == (7, 3e-4, False, 0.25, True)


# ---------------------------------------------------------------- 8. validation before anything loads
@pytest.mark.parametrize("extra, message", [
    ("learning_rat: 1.0e-5", "unknown key 'learning_rat'; did you mean 'learning_rate'"),
    ("num_epochs: 2", "unknown key 'num_epochs'; did you mean 'num_train_epochs'"),
    ("lora: {rank: 4}", "nested mappings.*did you mean lora_rank"),
    ("learning_rate: abc", "learning_rate.*invalid float value: 'abc'"),
    ("learning_rate: -1.0", "learning_rate must be > 0"),
    ("cutoff_len: 1", "cutoff_len must be >= 2"),
    ("gamma: .nan", "pref_beta: gamma must be finite"),
    ("gamma: 0.2\npref_beta: 0.1", "'gamma' and 'pref_beta' are the same key"),
    ("truncation: middle", "argument --truncation: invalid choice"),
    ("eval_strategy: steps", "eval_strategy needs an evaluation split"),
    ("resume_from_checkpoint: /no/such/checkpoint-3", "/no/such/checkpoint-3. is not a directory"),
])
def test_bad_config_is_refused_naming_the_key(tmp_path, ckpt, extra, message):
    paths, data = ckpt
    with pytest.raises(ConfigError, match=message):
        parse_config([write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", extra)])


def test_types_are_coerced_and_keys_honoured(tmp_path, ckpt):
    paths, data = ckpt
    c = parse_config([write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", 'learning_rate: "1e-5"',
                                   "save_steps: 7", "save_strategy: steps")])
    assert c.training.learning_rate == 1e-5 and c.training.save_steps == 7


def test_empty_or_missing_files_are_clear_errors(tmp_path, ckpt, capsys):
    paths, data = ckpt
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="missing model_name_or_path"):
        parse_config([str(tmp_path / "empty.yaml")])
    assert wspo_main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="dataset: .* is not a local file or directory"):
        parse_config([write_config(tmp_path / "c.yaml", paths, str(tmp_path / "nope.jsonl"), tmp_path / "out")])


# ---------------------------------------------------------------- 9. a mistyped model path fails at once
def test_mistyped_local_model_path_fails_at_once(tmp_path, ckpt):
    paths, data = ckpt
    typo = paths["weak_base"].replace("weak_base", "weak_bse")
    with pytest.raises(ConfigError, match=r"weak_base_model: no such model directory .*did you mean .*weak_base'"):
        parse_config([write_config(tmp_path / "c.yaml", dict(paths, weak_base=typo), data, tmp_path / "out")])
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ConfigError, match="without a config.json"):
        parse_config([write_config(tmp_path / "c.yaml", dict(paths, policy=str(tmp_path / "notamodel")), data,
                                   tmp_path / "out")])


# ---------------------------------------------------------------- 5. the data formats users have
def test_row_formats():
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert prompt_response({"prompt": "q", "response": "a"}) == ("q", "a", None)
    assert prompt_response({"prompt": "q", "chosen": "a", "rejected": "b"}) == ("q", "a", "b")
    assert prompt_response({"instruction": "q", "chosen": "a", "rejected": "b"}) == ("q", "a", "b")
    assert prompt_response({"instruction": "q", "input": "x", "output": "a"}) == ("q\nx", "a", None)
    assert prompt_response({"messages": chat}) == ([chat[0]], "a", None)
    reject = [chat[0], {"role": "assistant", "content": "b"}]
    assert prompt_response({"prompt": "q", "chosen": chat, "rejected": reject}) == ([chat[0]], "a", "b")
    trl = {"prompt": [chat[0]], "chosen": [chat[1]], "rejected": [{"role": "assistant", "content": "b"}]}
    assert prompt_response(trl) == ([chat[0]], "a", "b")  # TRL's conversational preference rows
    assert prompt_response({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) == \
        ([{"role": "user", "content": "q"}], "a", None)
    assert prompt_response({"prompt": "q", "response": "a", "system": "s"}) == \
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "a", None)
    with pytest.raises(ValueError, match="row 0 has keys \\['question'\\]; expected one of the formats"):
        prompt_response({"question": "q"})
    with pytest.raises(ValueError, match="last message must be the assistant's"):
        prompt_response({"messages": chat[:1] * 2})


def test_ultrafeedback_rows_are_truncated_by_the_official_rule(tmp_path, ckpt):
    """UltraFeedback-binarized rows carry prompt, chosen, rejected *and* messages (the chosen chat): they
    are read as preference rows, so the long rejected answer budgets the cut (issue 18, item 12)."""
    paths, _ = ckpt
    prompt, chosen, rejected = words(12), words(3, 20), words(14, 30)

    def chat(answer):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    full = {"prompt": prompt, "chosen": chat(chosen), "rejected": chat(rejected), "messages": chat(chosen)}
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths["policy"])
    rows = {}
    for name, row in (("full", full), ("without messages", {k: v for k, v in full.items() if k != "messages"})):
        data = tmp_path / f"{len(rows)}.jsonl"
        data.write_text(json.dumps(row) + "\n")
        config = parse_config([write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", "cutoff_len: 16")])
        rows[name] = cli.prepare_dataset(config.wspo, tokenizer, 16)[0]
    assert rows["full"] == rows["without messages"]
    kept_prompt = sum(y == -100 for y in rows["full"]["labels"])
    assert kept_prompt == infer_seqlen(12, 15, 16)[0] == 8  # the response budget is the rejected's 14 + EOS


def test_file_formats(tmp_path):
    rows = [{"prompt": "a b", "response": "c"}, {"prompt": "d", "response": "e f"}]
    (tmp_path / "pretty.json").write_text(json.dumps(rows, indent=4))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    for name in ("pretty.json", "lines.jsonl", "lines.json", "ds", "dd"):
        assert list(read_records(str(tmp_path / name))) == rows, name
    (tmp_path / "bad.json").write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.json:2: neither a JSON document nor JSON Lines"):
        read_records(str(tmp_path / "bad.json"))


def test_chat_messages_go_through_the_tokenizer_chat_template(ckpt):
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt[0]["policy"])
    # ChatML-like: the template renders a separator after the end-of-turn token, which is not trained on.
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }} {% if m['role'] == 'assistant' %}</s> "
                               "w41 {% endif %}{% endfor %}{% if add_generation_prompt %}w40 {% endif %}")
    prompt, response, _ = prompt_response({"messages": [{"role": "user", "content": "w1 w2"},
                                                        {"role": "assistant", "content": "w3"}]})
    p_ids, r_ids = encode_prompt_response(tokenizer, prompt, response)
    tok = tokenizer.convert_tokens_to_ids
    assert p_ids == [tok("w1"), tok("w2"), tok("w40")] and r_ids == [tok("w3"), tok("</s>")]


# ---------------------------------------------------------------- 4. truncation: the official rule by default
@pytest.mark.parametrize("source, target, cutoff, want", [
    (10, 3, 8, (5, 3)),     # short response kept whole, the prompt keeps its start
    (3, 10, 8, (3, 5)),     # short prompt kept whole
    (10, 10, 8, (4, 4)),    # both long: in proportion
    (30, 10, 8, (6, 2)),    # int(8 * 10 / 40) = 2 response tokens
])
def test_infer_seqlen_is_the_official_rule(source, target, cutoff, want):
    assert infer_seqlen(source, target, cutoff) == want


def test_truncation_keeps_the_start_by_default_and_offers_prompt_left():
    prompt, response = list(range(1, 11)), [20, 21, 22]
    assert build_example(prompt, response, max_length=8)["input_ids"] == [1, 2, 3, 4, 5, 20, 21, 22]
    assert build_example(prompt, response, max_length=8, truncation="prompt_left")["input_ids"] == \
        [6, 7, 8, 9, 10, 20, 21, 22]
    # A preference pair: the official rule budgets the longer response (rejected: 10 tokens, chosen: 3).
    assert build_example(list(range(1, 8)), response, max_length=10, paired_len=10)["input_ids"] == \
        [1, 2, 3, 4, 5, 20, 21, 22]


def test_rows_are_cut_to_the_models_context_and_counted(tmp_path, ckpt, capsys):
    paths, _ = ckpt
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": words(3), "response": words(n)}) for n in (2, 100, 5)))
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out")
    ds = cli.precompute_main([config, "cutoff_len=4096"])  # the tiny models have 64 positions
    out = capsys.readouterr().out
    assert "cutoff_len 4096 exceeds the context of" in out and "1 cut to 64 tokens (infer_seqlen)" in out
    assert max(len(r) for r in ds["input_ids"]) == 64


# ---------------------------------------------------------------- 11. rows without a response token
def test_rows_without_a_response_token_are_dropped_once_and_counted(tmp_path, ckpt, capsys):
    paths, _ = ckpt
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": words(8 if i % 2 else 1), "response": words(1)}) for i in range(8)))
    # cutoff 4: an 8-token prompt and a 2-token response (+ EOS) keep int(4 * 2 / 10) = 0 response tokens
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", "cutoff_len: 4")
    ds = cli.precompute_main([config])
    out = capsys.readouterr().out
    assert len(ds) == 4 and "4 examples from" in out and "4 dropped (no response token" in out
    trainer = cli.train_main([config, "per_device_train_batch_size=1", "gradient_accumulation_steps=7", "max_steps=1"])
    assert trainer.state.global_step == 1


# ---------------------------------------------------------------- 10. the precompute cache is fingerprinted
def test_cache_is_reused_only_for_the_same_models_and_rows(tmp_path, monkeypatch, capsys):
    paths, data = save_tiny_checkpoints(tmp_path)
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out")
    loads = []
    real = cli._load_model
    monkeypatch.setattr(cli, "_load_model", lambda name, dtype: loads.append(os.path.basename(name)) or real(name, dtype))
    first = cli.precompute_main([config])
    assert sorted(loads) == ["policy", "weak_aligned", "weak_base"]
    loads.clear()
    cli.train_main([config])  # the cache is complete: only the policy is loaded
    assert loads == ["policy"] and "reusing the precomputed logps" in capsys.readouterr().out
    tiny(7).save_pretrained(paths["weak_aligned"])  # a different weak aligned model at the same path
    second = cli.precompute_main([config])
    assert "made for a different weak_aligned model: recomputing" in capsys.readouterr().out
    assert second["weak_aligned_logps"] != first["weak_aligned_logps"] and second["ref_logps"] == first["ref_logps"]
    third = cli.precompute_main([config, "cutoff_len=5"])  # other rows
    assert "made for a different dataset" in capsys.readouterr().out
    assert max(len(r) for r in third["input_ids"]) == 5
    cache = tmp_path / "out" / "precomputed"
    for f in (cache / "dataset").iterdir():  # a broken complete cache: recomputed
        if f.suffix == ".arrow":
            f.write_bytes(b"broken")
    assert cli.precompute_main([config, "cutoff_len=5"])["weak_base_logps"] == third["weak_base_logps"]
    shutil.rmtree(cache / "dataset")  # an interrupted run that left a broken shard behind
    (cache / "shards" / "00000").mkdir(parents=True)
    (cache / "shards" / "00000" / "data-00000-of-00001.arrow").write_bytes(b"broken")
    capsys.readouterr()
    fourth = cli.precompute_main([config, "cutoff_len=5"])
    assert "has no whole checksums.json" in capsys.readouterr().out and fourth["weak_base_logps"] == third["weak_base_logps"]


# ---------------------------------------------------------------- 2, 3. fp32 trainable parameters, seeded adapters
def test_bf16_keeps_trainable_parameters_in_fp32(tmp_path, ckpt):
    paths, data = ckpt
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", "learning_rate: 1.0e-5",
                          "warmup_ratio: 0.0")
    trainer = cli.train_main([config, "bf16=true", "max_steps=1"])
    start = tiny(0)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    changed = sum(int((p.detach() != q).sum()) for p, q in zip(trainer.model.parameters(), start.parameters()))
    assert changed > 0.9 * sum(p.numel() for p in start.parameters())
    lora = cli.train_main([config, "bf16=true", "max_steps=1", "finetuning_type=lora", "lora_target=q_proj,v_proj"])
    dtypes = {(p.dtype, p.requires_grad) for p in lora.model.parameters()}
    assert dtypes == {(torch.float32, True), (torch.bfloat16, False)}


def test_same_config_gives_the_same_adapters(tmp_path, ckpt):
    paths, data = ckpt
    runs = []
    for i in range(2):
        config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / f"out{i}", "finetuning_type: lora",
                              "lora_rank: 4", "seed: 3")
        trainer = cli.train_main([config, "max_steps=1"])
        runs.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n})
    assert runs[0] and all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


# ---------------------------------------------------------------- 12. resume, checkpoint pruning, portable adapters
def test_resume_prune_and_portable_adapters(tmp_path, ckpt, monkeypatch, capsys):
    paths, data = ckpt
    monkeypatch.chdir(tmp_path)
    shutil.copytree(paths["policy"], tmp_path / "policy")
    config = write_config(tmp_path / "c.yaml", dict(paths, policy="policy"), data, "out", "finetuning_type: lora",
                          "save_strategy: steps", "save_steps: 1", "save_total_limit: 1")
    cli.train_main([config, "max_steps=2"])
    assert sorted(d for d in os.listdir("out") if d.startswith("checkpoint-")) == ["checkpoint-2"]
    assert "LoRA adapters saved to " + str(tmp_path / "out") in capsys.readouterr().out
    trainer = cli.train_main([config, "max_steps=3", "resume_from_checkpoint=true"])
    assert trainer.state.global_step == 3
    assert sorted(d for d in os.listdir("out") if d.startswith("checkpoint-")) == ["checkpoint-3"]
    with open(tmp_path / "out" / "adapter_config.json") as f:
        base = json.load(f)["base_model_name_or_path"]
    assert base == str(tmp_path / "policy")  # absolute: loads from any directory
    monkeypatch.chdir(tmp_path.parent)
    peft = pytest.importorskip("peft")
    peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out"))


# ---------------------------------------------------------------- review follow-ups
def test_structured_values_flags_and_precedence(tmp_path, ckpt):
    paths, data = ckpt
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", "warmup_ratio: 0.2",
                          "lr_scheduler_kwargs: {min_lr_rate: 0.1}", "report_to: []", "lora_target: [q_proj, v_proj]")
    c = parse_config([config, "warmup_steps=5", "--no_precompute", "--no-disable-dropout"])
    assert c.training.lr_scheduler_kwargs == {"min_lr_rate": 0.1} and c.training.report_to in ([], "none", ["none"])
    assert c.training.warmup_steps == 5 and (c.wspo.precompute, c.wspo.disable_dropout) == (False, False)
    assert c.wspo.lora_target == "q_proj,v_proj"
    c = parse_config([config, "fp16=true"])  # the recipe's bf16 default gives way
    assert (c.training.fp16, c.training.bf16) == (True, False)
    with pytest.raises(ConfigError, match="warmup_ratio must be a number"):
        parse_config([config, "warmup_ratio=abc"])
    odd = tmp_path / "lr=1e-5"
    odd.mkdir()
    shutil.copy(config, odd / "c.yaml")
    assert parse_config([str(odd / "c.yaml")]).training.max_steps == 2  # a config path with '=' in it


def test_hub_ids_are_checked_with_one_request(tmp_path, ckpt, monkeypatch):
    paths, data = ckpt
    config = write_config(tmp_path / "c.yaml", dict(paths, weak_base="wspo-kernels-test/no-such-model-xyz"), data,
                          tmp_path / "out")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not in the Hub cache \\(HF_HUB_OFFLINE is set\\)"):
        parse_config([config])
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ConfigError, match="no-such-model-xyz.*(nor a model on the Hugging Face Hub|cannot be reached)"):
        parse_config([config])


def test_context_not_a_multiple_of_eight(tmp_path):
    paths, _ = save_tiny_checkpoints(tmp_path, max_position_embeddings=60)
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": words(5), "response": words(n)}) for n in (80, 3, 70, 2)))
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", "cutoff_len: 4096")
    trainer = cli.train_main([config])  # rows cut to 60, padded to a multiple of 8 only up to 60
    assert trainer.state.global_step == 2


def test_data_errors_and_small_datasets_fail_before_loading(tmp_path, ckpt, capsys):
    paths, _ = ckpt
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "w1"}) + "\n")
    assert wspo_main(["train", write_config(tmp_path / "c.yaml", paths, bad, tmp_path / "out")]) == 2
    assert "row 0 has keys ['question']" in capsys.readouterr().err
    two = tmp_path / "two.jsonl"
    two.write_text("\n".join(json.dumps({"prompt": words(2), "response": words(2)}) for _ in range(2)))
    with pytest.raises(ConfigError, match="val_size 2.0 leaves no training example of 2"):
        cli.precompute_main([write_config(tmp_path / "c.yaml", paths, two, tmp_path / "out", "val_size: 2")])


def test_do_eval_runs_a_final_evaluation(tmp_path, ckpt):
    paths, data = ckpt
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", "val_size: 0.25", "do_eval: true")
    cli.train_main([config])
    with open(tmp_path / "out" / "eval_results.json") as f:
        assert "eval_loss" in json.load(f)


def test_cache_notices_a_change_anywhere_in_a_weight_file(tmp_path, capsys):
    paths, data = save_tiny_checkpoints(tmp_path)
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out")
    first = cli.precompute_main([config])
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["weak_base"])
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)  # one tensor in the middle of the file
    model.save_pretrained(paths["weak_base"])
    second = cli.precompute_main([config])
    assert "made for a different weak_base model" in capsys.readouterr().out
    assert second["weak_base_logps"] != first["weak_base_logps"]


def test_log_window_without_response_tokens(tmp_path):
    from wspo_kernels.train import WSPOTrainer
    from wspo_kernels.train.data import WSPODataCollator
    from transformers import TrainingArguments
    policy = tiny(0)
    trainer = WSPOTrainer(policy, TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                          ref_model=tiny(1), weak_aligned_model=tiny(2), weak_base_model=tiny(3))
    trainer.compute_loss(policy.train(), WSPODataCollator(0)([{"input_ids": [1, 2, 3], "labels": [-100] * 3}]))
    logs = {"loss": 0.0}
    trainer.log(logs)
    assert logs["logps/chosen"] == 0.0 and "wspo/delta_strong" not in logs


def test_deepspeed_zero3_config_runs(tmp_path, ckpt):
    """The official recipe's `deepspeed:` key with a ZeRO-3 config (one CPU process; its own process, as
    DeepSpeed initialises torch.distributed); frozen models load whole, the policy partitioned."""
    pytest.importorskip("deepspeed")
    paths, data = ckpt
    ds_config = tmp_path / "ds_z3.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                     "train_micro_batch_size_per_gpu": "auto",
                                     "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
                                     "gradient_clipping": "auto"}))
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", f"deepspeed: {ds_config}")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    for precompute in ("true", "false"):
        out = subprocess.run([sys.executable, "-m", "wspo_kernels", "train", config, f"precompute={precompute}"],
                             capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "model saved to" in out.stdout


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
