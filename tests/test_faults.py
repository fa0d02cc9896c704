"""The CLI under the faults of a real job: kills and Ctrl-C (also mid-checkpoint), corrupted caches and
shards, NaN / inf models and steps, a full disk, an unwritable output_dir, two runs on one directory.

Each test asserts either the result of an uninterrupted run (same logps, same weights) or one clear line
on stderr with the documented exit status (1 a run that cannot go on, 2 a config error, 130 Ctrl-C) and
nothing half-written left where a later run would take it.  Faults that kill a process run the CLI in a
subprocess through ``RUNNER``, which injects the fault at an exact point (no timing races)."""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("yaml")

from train_fixtures import VOCAB, save_tiny_checkpoints, tiny, write_config  # noqa: E402

from wspo_kernels.__main__ import main as wspo_main  # noqa: E402
from wspo_kernels.train import checkpoints, cli  # noqa: E402
from wspo_kernels.train import precompute as precompute_mod  # noqa: E402
from wspo_kernels.train.config import ConfigError, parse_config  # noqa: E402
from wspo_kernels.train.data import LOGPS_COLUMNS  # noqa: E402

LOGPS = list(LOGPS_COLUMNS.values())
PAGE = 4096

# Runs `wspo-kernels ARGS...` with one fault injected at an exact point:
#   kill-in-save:N / sigint-in-save:N   SIGKILL / SIGINT itself while checkpoint-N is being written
#   kill-before-record:N                SIGKILL itself once checkpoint-N is written, before its completion record
#   stop-after-shard:N / kill-after-shard:N   SIGSTOP (as a scheduler suspends a job) / SIGKILL itself once
#                                              shard N is saved
RUNNER = r"""
import os, signal, sys
fault, point = sys.argv[1].split(":")
point = int(point)
if fault in ("kill-in-save", "sigint-in-save"):
    from transformers import Trainer
    real = Trainer._save_rng_state
    def save_rng(self, output_dir):  # the model and optimizer are written, the state is not
        if self.state.global_step == point:
            os.kill(os.getpid(), signal.SIGKILL if fault == "kill-in-save" else signal.SIGINT)
        return real(self, output_dir)
    Trainer._save_rng_state = save_rng
elif fault == "kill-before-record":
    import wspo_kernels.train.checkpoints as ck
    real = ck.mark_complete
    def mark(path, step):  # every rank's files and trainer_state.json are written, the record is not
        if step == point:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, step)
    ck.mark_complete = mark
elif fault in ("stop-after-shard", "kill-after-shard"):
    import wspo_kernels.train.precompute as pre
    name = "_save_verified" if hasattr(pre, "_save_verified") else "_save_atomically"  # before checksums
    real = getattr(pre, name)
    def save(ds, path, *a, **k):
        real(ds, path, *a, **k)
        if path.endswith(f"shards/{point:05d}"):
            os.kill(os.getpid(), signal.SIGSTOP if fault == "stop-after-shard" else signal.SIGKILL)
    setattr(pre, name, save)
from wspo_kernels.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def run_cli(*args, fault="none:0", **kw):
    return subprocess.run([sys.executable, "-c", RUNNER, fault, *args], capture_output=True, text=True, timeout=600,
                          **kw)


def start_cli(*args, fault="none:0"):
    return subprocess.Popen([sys.executable, "-c", RUNNER, fault, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def one_line_error(stderr, pattern):
    """stderr holds one line from the CLI (progress bars and warnings aside), with no traceback, matching
    ``pattern``."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.startswith("wspo-kernels ")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), stderr[-3000:]


def saved_weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst == 0, f"weights differ by up to {worst}"


def write_rows(path, n):
    g = torch.Generator().manual_seed(1)
    with open(path, "w") as f:
        for i in range(n):
            p = torch.randint(0, VOCAB - 4, (3,), generator=g).tolist()
            r = torch.randint(0, VOCAB - 4, (1 + i % 4,), generator=g).tolist()
            f.write(json.dumps({"prompt": " ".join(f"w{j}" for j in p), "response": " ".join(f"w{j}" for j in r)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"))


def cache_arrow(out, part="dataset"):
    folder = os.path.join(out, "precomputed", part)
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".arrow")][0]


def flip_bit_at(path, offset, bit=0):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 1 << bit
    open(path, "wb").write(bytes(data))


def offset_of(path, needle):
    data = open(path, "rb").read()
    assert data.count(needle) >= 1, "value not found in the file"
    return data.index(needle)


# ---------------------------------------------------------------- 1. a corrupted cache is never used
@pytest.mark.parametrize("damage", ["logp-bit", "label-bit", "zeroed-page", "truncated"])
def test_corrupted_cache_is_recomputed(tmp_path, ckpt, capsys, damage):
    paths, data = ckpt
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out")
    clean = cli.precompute_main([config])
    arrow = cache_arrow(tmp_path / "out")
    if damage == "logp-bit":  # one bit of one weak_base logp
        flip_bit_at(arrow, offset_of(arrow, struct.pack("<f", clean["weak_base_logps"][5][-1])), bit=3)
        differs = ("does not match its checksums (weak_base_logps differ",)
    elif damage == "label-bit":  # one label of one row (int64 in the file)
        row = clean["labels"][7]
        flip_bit_at(arrow, offset_of(arrow, struct.pack(f"<{len(row)}q", *row)) + 8 * (len(row) - 1), bit=1)
        differs = ("does not match its checksums (labels differ",)
    elif damage == "zeroed-page":  # the 4 KiB page that holds the logps
        off = offset_of(arrow, struct.pack("<f", clean["ref_logps"][3][-1]))
        data_ = bytearray(open(arrow, "rb").read())
        start = off // PAGE * PAGE
        data_[start:start + PAGE] = bytes(min(PAGE, len(data_) - start))
        open(arrow, "wb").write(bytes(data_))
        differs = ("does not load", "does not match its checksums", "is unreadable")
    else:
        with open(arrow, "r+b") as f:
            f.truncate(os.path.getsize(arrow) // 2)
        differs = ("does not load", "is unreadable")
    capsys.readouterr()
    trainer = cli.train_main([config])
    out = capsys.readouterr().out
    assert "reusing the precomputed logps" not in out and "recomputing" in out, out
    assert any(d in out for d in differs) and "wspo-kernels: wspo-kernels" not in out, out
    repaired = datasets.load_from_disk(str(tmp_path / "out" / "precomputed" / "dataset"))
    for c in LOGPS + ["input_ids", "labels"]:
        assert repaired[c] == clean[c], c
    assert trainer.train_dataset["labels"] == clean["labels"]
    capsys.readouterr()
    cli.precompute_main([config])
    assert "reusing the precomputed logps" in capsys.readouterr().out  # and now it is whole again


def test_a_record_that_lies_about_its_rows_is_not_trusted(tmp_path, ckpt, capsys):
    """Rows changed together with their checksums (a hand-edited cache): the rows no longer hash to the
    fingerprint, so the freshly tokenised rows win."""
    paths, data = ckpt
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out")
    clean = cli.precompute_main([config])
    folder = tmp_path / "out" / "precomputed" / "dataset"
    record = json.loads((folder / "checksums.json").read_text())
    other = clean.map(lambda r: {"labels": [-100] + r["labels"][1:-1] + [5]})
    other.save_to_disk(str(tmp_path / "other"))
    record["columns"] = precompute_mod.column_checksums(other, other.column_names)
    for f in (tmp_path / "other").iterdir():
        if f.suffix == ".arrow":
            os.replace(f, next(folder.glob("*.arrow")))
    (folder / "checksums.json").write_text(json.dumps(record))
    capsys.readouterr()
    again = cli.precompute_main([config])
    assert "holds other rows than its fingerprint names" in capsys.readouterr().out
    assert again["labels"] == clean["labels"] and again["ref_logps"] == clean["ref_logps"]


# ---------------------------------------------------------------- 2. shards of an interrupted run are checked
def test_damaged_shard_is_recomputed_on_resume(tmp_path, monkeypatch):
    ds = datasets.Dataset.from_list(_rows(10))
    frozen = dict(ref_model=tiny(1), weak_aligned_model=tiny(2), weak_base_model=tiny(3))
    out = tmp_path / "pre"
    clean = precompute_mod.precompute_logps(ds, **frozen, batch_size=2, shard_size=4, progress=False)
    writer = "_save_verified" if hasattr(precompute_mod, "_save_verified") else "_save_atomically"
    real, saved = getattr(precompute_mod, writer), []

    def interrupted(shard, path, *a):
        real(shard, path, *a)
        saved.append(path)
        if len(saved) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(precompute_mod, writer, interrupted)
    with pytest.raises(KeyboardInterrupt):
        precompute_mod.precompute_logps(ds, **frozen, batch_size=2, shard_size=4, output_dir=str(out), progress=False)
    monkeypatch.setattr(precompute_mod, writer, real)
    shard0 = out / "shards" / "00000"
    arrow = str(next(shard0.glob("*.arrow")))
    row = max(clean["weak_aligned_logps"][:4], key=len)  # a whole row of values: found once in the file
    flip_bit_at(arrow, offset_of(arrow, struct.pack(f"<{len(row)}f", *row)), bit=5)
    logs = []
    resumed = precompute_mod.precompute_logps(ds, **frozen, batch_size=2, shard_size=4, output_dir=str(out),
                                              progress=False, log=logs.append)
    for c in LOGPS:
        assert resumed[c] == clean[c], c
    assert any("shard 0" in m and "does not match its checksums (weak_aligned_logps differ" in m for m in logs), logs
    assert not any("shard 1" in m for m in logs)  # the whole shard is kept


def _rows(n):
    from train_fixtures import examples
    return examples(n)


# ---------------------------------------------------------------- 3. NaN / inf in a frozen model or a step
@pytest.mark.parametrize("role, value", [("weak_base", float("nan")), ("weak_aligned", float("inf"))])
def test_nonfinite_frozen_model_is_refused(tmp_path, role, value, capsys):
    paths, data = save_tiny_checkpoints(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(paths[role])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 5] = value
    model.save_pretrained(paths[role])
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out")
    assert wspo_main(["precompute", config]) == 1
    one_line_error(capsys.readouterr().err, rf"error: {role} \({re.escape(paths[role])}\) gives non-finite logps for "
                                            r"\d+ of \d+ tokens")
    assert not os.path.exists(tmp_path / "out" / "precomputed" / "dataset")
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
    assert wspo_main(["train", config, "precompute=false"]) == 1  # resident: refused when the trainer is built
    one_line_error(capsys.readouterr().err, rf"error: {role} \(.*\) has 1 non-finite weights .*down_proj")


def test_nonfinite_policy_stops_training_and_saves_nothing(tmp_path, capsys):
    paths, data = save_tiny_checkpoints(tmp_path)
    paths["ref"] = str(tmp_path / "ref")
    tiny(0).save_pretrained(paths["ref"])
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["policy"])
    with torch.no_grad():
        model.model.norm.weight[2] = float("nan")
    model.save_pretrained(paths["policy"])
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", f"ref_model: {paths['ref']}")
    assert wspo_main(["train", config]) == 1
    one_line_error(capsys.readouterr().err, r"the loss and gradient norm are not finite .* in step 1; training stopped "
                                            r"before the optimizer step, nothing was saved .* the policy has 1 "
                                            r"non-finite weights \(the first in model.norm.weight\)")
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_a_step_that_diverges_stops_before_the_optimizer_step(tmp_path, ckpt, monkeypatch):
    """Steps 1-2 are fine and checkpointed; step 3's loss is NaN: training stops with the weights of step
    2, no checkpoint-3 is written, checkpoint-2 stays complete.  A NaN gradient with a finite loss too.
    ``stop_on_nonfinite=False`` trains on (the plain Trainer's behaviour)."""
    from wspo_kernels.train.trainer import NonFiniteError, WSPOTrainer
    paths, data = ckpt
    real = WSPOTrainer.compute_loss

    def diverging(self, model, inputs, *a, **k):
        loss = real(self, model, inputs, *a, **k)
        return loss * float("nan") if self.state.global_step == 2 and self.loss_fault == "loss" else loss
    monkeypatch.setattr(WSPOTrainer, "compute_loss", diverging)
    for fault in ("loss", "grad"):
        out = tmp_path / fault
        config = write_config(tmp_path / "c.yaml", paths, data, out, "max_steps: 4", "save_strategy: steps",
                              "save_steps: 1", "per_device_train_batch_size: 2")
        monkeypatch.setattr(WSPOTrainer, "loss_fault", fault, raising=False)
        seen = {}
        real_train = WSPOTrainer.train

        def train(self, *a, **k):
            seen["trainer"] = self
            if fault == "grad":
                p = next(self.model.parameters())
                p.register_hook(lambda g: g * float("nan") if self.state.global_step == 2 else g)
            return real_train(self, *a, **k)
        monkeypatch.setattr(WSPOTrainer, "train", train)
        with pytest.raises(NonFiniteError, match="the loss and gradient norm are not finite .* in step 3" if fault == "loss"
                           else "the gradient norm is not finite .* in step 3"):
            cli.train_main([config])
        trainer = seen["trainer"]
        assert trainer.state.global_step == 2
        assert not os.path.exists(out / "checkpoint-3") and not os.path.exists(out / "model.safetensors")
        assert checkpoints.why_incomplete(str(out / "checkpoint-2")) is None
        at_2 = saved_weights(str(out / "checkpoint-2"))
        assert_same_weights({k: v.detach() for k, v in trainer.model.state_dict().items() if k in at_2}, at_2)
        monkeypatch.setattr(WSPOTrainer, "train", real_train)
    trainer = cli.train_main([config, "stop_on_nonfinite=false", "overwrite_output_dir=true"])
    assert trainer.state.global_step == 4


# ---------------------------------------------------------------- 4. two runs on one output_dir
@pytest.mark.slow
def test_concurrent_precomputes_do_not_mix(tmp_path):
    """Run A (weak_aligned X) is suspended after its 2nd shard; run B (weak_aligned Y) on the same
    output_dir waits for A's lock instead of mixing shards; A is resumed; both finish, B's cache holds
    B's logps exactly, and training with B's models reuses it."""
    paths, _ = save_tiny_checkpoints(tmp_path)
    data = write_rows(tmp_path / "rows.jsonl", 600)  # 3 shards of 256
    other = str(tmp_path / "weak_aligned_b")
    tiny(11).save_pretrained(other)
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out")
    a = start_cli("precompute", config, fault="stop-after-shard:1")
    deadline = time.time() + 300
    while not _stopped(a.pid):
        assert a.poll() is None and time.time() < deadline, a.stdout.read() if a.poll() is not None else "timeout"
        time.sleep(0.05)
    b = start_cli("precompute", config, f"weak_aligned_model={other}")
    waiting = _read_until(b, "is in use by pid", deadline)
    assert f"pid {a.pid}" in waiting and b.poll() is None
    os.kill(a.pid, signal.SIGCONT)
    a_out, _ = a.communicate(timeout=300)
    b_out, _ = b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, (a_out[-2000:], b_out[-2000:])
    assert "made for a different weak_aligned model: recomputing" in b_out
    cached = datasets.load_from_disk(str(tmp_path / "out" / "precomputed" / "dataset"))
    clean_config = write_config(tmp_path / "c2.yaml", paths, data, tmp_path / "clean")
    clean = run_cli("precompute", clean_config, f"weak_aligned_model={other}")
    assert clean.returncode == 0, clean.stderr[-2000:]
    want = datasets.load_from_disk(str(tmp_path / "clean" / "precomputed" / "dataset"))
    for c in LOGPS:
        assert cached[c] == want[c], c
    stored = json.loads((tmp_path / "out" / "precomputed" / "fingerprint.json").read_text())
    assert stored == json.loads((tmp_path / "clean" / "precomputed" / "fingerprint.json").read_text())
    trained = run_cli("train", config, f"weak_aligned_model={other}")
    assert trained.returncode == 0 and "reusing the precomputed logps" in trained.stdout, trained.stderr[-2000:]


def test_killed_or_interrupted_precompute_resumes_exactly(tmp_path, ckpt, capsys, monkeypatch):
    """SIGKILL after shard 1 of 3: the rerun keeps shards 0-1 (checked) and ends equal to a clean run.
    Ctrl-C mid-shard: one line, exit 130, and again a rerun ends equal."""
    paths, _ = ckpt
    data = write_rows(tmp_path / "rows.jsonl", 600)
    clean = cli.precompute_main([write_config(tmp_path / "c0.yaml", paths, data, tmp_path / "clean")])
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out")
    killed = run_cli("precompute", config, fault="kill-after-shard:1")
    assert killed.returncode == -signal.SIGKILL and sorted(os.listdir(tmp_path / "out" / "precomputed" / "shards")) \
        == ["00000", "00001"]
    calls = []
    real = precompute_mod._shard_logps
    # (the last argument: the dataset row numbers of the batch, which runs longest first)
    monkeypatch.setattr(precompute_mod, "_shard_logps", lambda *a: calls.append(min(a[-1])) or real(*a))
    again = cli.precompute_main([config])
    assert min(calls) == 512  # only shard 2 was computed
    for c in LOGPS:
        assert again[c] == clean[c], c
    config = write_config(tmp_path / "c2.yaml", paths, data, tmp_path / "int")
    monkeypatch.setattr(precompute_mod, "_shard_logps",
                        lambda *a: (_ for _ in ()).throw(KeyboardInterrupt) if min(a[-1]) >= 300 else real(*a))
    capsys.readouterr()
    assert wspo_main(["precompute", config]) == 130
    one_line_error(capsys.readouterr().err, r"interrupted during precompute; the finished shards in \S+ are kept and "
                                            "checked: rerun the same command to go on")
    monkeypatch.setattr(precompute_mod, "_shard_logps", real)
    again = cli.precompute_main([config])
    for c in LOGPS:
        assert again[c] == clean[c], c


def _stopped(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def _read_until(proc, text, deadline):
    seen = ""
    while text not in seen:
        assert time.time() < deadline, seen
        line = proc.stdout.readline()
        assert line, seen  # the process ended without waiting
        seen += line
    return seen


# ---------------------------------------------------------------- 5, 7, 10. kills and Ctrl-C, resume, requeue
def _train_config(tmp_path, paths, data, out, *extra):
    return write_config(tmp_path / "c.yaml", paths, data, out, "max_steps: 6", "save_strategy: steps", "save_steps: 2",
                        "save_total_limit: 2", "per_device_train_batch_size: 2", "learning_rate: 1.0e-3",
                        "lr_scheduler_type: constant", "warmup_ratio: 0.0", *extra)


@pytest.mark.slow
def test_kill_or_ctrl_c_during_a_checkpoint_then_rerun(tmp_path):
    """SIGKILL while checkpoint-4 is written leaves an incomplete directory; the same command, rerun (a
    requeued job), skips and removes it, resumes from checkpoint-2 and ends with the weights of an
    uninterrupted run.  Ctrl-C at the same point: one line, exit 130, no checkpoint-4 left."""
    paths, data = save_tiny_checkpoints(tmp_path)
    clean = run_cli("train", _train_config(tmp_path, paths, data, tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    config = _train_config(tmp_path, paths, data, tmp_path / "out")
    killed = run_cli("train", config, fault="kill-in-save:4")
    assert killed.returncode == -signal.SIGKILL and os.path.isdir(tmp_path / "out" / "checkpoint-4")
    rerun = run_cli("train", config, "resume_from_checkpoint=true")  # a requeue script's flag
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "checkpoint-4 is incomplete" in rerun.stdout and "resuming from" in rerun.stdout
    assert re.search(r"resuming from \S+checkpoint-2 \(step 2\)", rerun.stdout) and \
        "starts over" not in rerun.stdout, rerun.stdout
    assert_same_weights(saved_weights(str(tmp_path / "out")), saved_weights(str(tmp_path / "clean")))
    config = _train_config(tmp_path, paths, data, tmp_path / "rec")
    killed = run_cli("train", config, fault="kill-before-record:4")  # checkpoint-4 whole but for its record
    assert killed.returncode == -signal.SIGKILL and os.path.exists(tmp_path / "rec" / "checkpoint-4" / "trainer_state.json")
    rerun = run_cli("train", config, "resume_from_checkpoint=true")
    assert rerun.returncode == 0 and "checkpoint-4 is incomplete (interrupted while it was written)" in rerun.stdout
    assert_same_weights(saved_weights(str(tmp_path / "rec")), saved_weights(str(tmp_path / "clean")))
    config = _train_config(tmp_path, paths, data, tmp_path / "int")
    interrupted = run_cli("train", config, fault="sigint-in-save:4")
    assert interrupted.returncode == 130
    one_line_error(interrupted.stderr, r"interrupted at step 4; last complete checkpoint \S+checkpoint-2: rerun the "
                                       "same command to resume from it")
    assert not os.path.exists(tmp_path / "int" / "checkpoint-4")
    rerun = run_cli("train", config)
    assert rerun.returncode == 0
    assert_same_weights(saved_weights(str(tmp_path / "int")), saved_weights(str(tmp_path / "clean")))


@pytest.mark.slow
def test_two_ranks_resume_together_and_stop_together(tmp_path):
    """torchrun, 2 gloo ranks: rank 0 decides where to resume and both resume there (a rerun at max_steps
    trains nothing on either); a NaN policy stops both ranks at the same step, each with the one line (the
    non-finite flag is summed over the ranks: no rank is left waiting in a collective)."""
    paths, data = save_tiny_checkpoints(tmp_path)
    ref = str(tmp_path / "ref")
    tiny(0).save_pretrained(ref)
    config = _train_config(tmp_path, paths, data, tmp_path / "out", "max_steps: 4", "ddp_backend: gloo")

    def torchrun(*args):
        from train_fixtures import free_port
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(free_port()), "-m", "wspo_kernels", "train", config, *args],
                              capture_output=True, text=True, timeout=600)
    first = torchrun()
    assert first.returncode == 0, first.stderr[-3000:]
    again = torchrun()
    assert again.returncode == 0 and again.stdout.count("is at step 4 of 4: nothing left to train") == 2, again.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["policy"])
    with torch.no_grad():
        model.model.norm.weight[2] = float("nan")
    model.save_pretrained(str(tmp_path / "nan_policy"))
    transformers.AutoTokenizer.from_pretrained(paths["policy"]).save_pretrained(str(tmp_path / "nan_policy"))
    nan = torchrun(f"model_name_or_path={tmp_path / 'nan_policy'}", f"ref_model={ref}", f"output_dir={tmp_path / 'nan'}")
    errors = re.findall(r"wspo-kernels train: error: [^\n]*", nan.stdout + nan.stderr)
    assert nan.returncode != 0 and len(errors) == 2 and all("in step 1; training stopped" in e for e in errors), \
        nan.stderr[-3000:]


def test_incomplete_checkpoints_are_never_taken(tmp_path, ckpt, capsys):
    paths, data = ckpt
    out = tmp_path / "out"
    config = _train_config(tmp_path, paths, data, out, "max_steps: 4")
    cli.train_main([config])
    final = saved_weights(str(out))
    # The newest checkpoints torn two ways: a weight file cut short (its trainer_state.json is whole), and a
    # directory holding only the start of a trainer_state.json.
    with open(out / "checkpoint-4" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    os.makedirs(out / "checkpoint-6")
    (out / "checkpoint-6" / "trainer_state.json").write_text('{"global_st')
    with pytest.raises(ConfigError, match="checkpoint-6' is incomplete"):
        parse_config([config, f"resume_from_checkpoint={out / 'checkpoint-6'}"])
    capsys.readouterr()
    trainer = cli.train_main([config, "resume_from_checkpoint=true"])
    text = capsys.readouterr().out
    assert "checkpoint-6 is incomplete" in text and "checkpoint-4 is incomplete (model.safetensors holds 100" in text
    assert re.search(r"resuming from \S+checkpoint-2 \(step 2\)", text)
    assert "removing the incomplete" in text and not os.path.exists(out / "checkpoint-6")
    assert trainer.state.global_step == 4 and checkpoints.why_incomplete(str(out / "checkpoint-4")) is None
    assert_same_weights(saved_weights(str(out)), final)  # steps 3-4 redone from checkpoint-2: the same weights


# ---------------------------------------------------------------- 6, 7. resuming at the end, requeues, starting over
def test_resume_at_max_steps_trains_nothing(tmp_path, ckpt, capsys):
    paths, data = ckpt
    out = tmp_path / "out"
    config = _train_config(tmp_path, paths, data, out, "max_steps: 4")  # 12 rows in batches of 2: mid-epoch
    cli.train_main([config])
    final = saved_weights(str(out))
    capsys.readouterr()
    trainer = cli.train_main([config, "resume_from_checkpoint=true"])
    text = capsys.readouterr().out
    assert "is at step 4 of 4: nothing left to train" in text and trainer.state.global_step == 4
    assert_same_weights(saved_weights(str(out)), final)
    trainer = cli.train_main([config, "max_steps=5"])  # the default: resume, and one more step to do
    assert trainer.state.global_step == 5 and "resuming from" in capsys.readouterr().out


def test_requeue_resumes_and_overwrite_starts_over(tmp_path, ckpt, capsys, monkeypatch):
    from wspo_kernels.train.trainer import WSPOTrainer
    paths, data = ckpt
    out = tmp_path / "out"
    config = _train_config(tmp_path, paths, data, out, "max_steps: 2")
    steps = []
    real = WSPOTrainer.training_step
    monkeypatch.setattr(WSPOTrainer, "training_step", lambda self, *a, **k: steps.append(1) or real(self, *a, **k))
    trainer = cli.train_main([config, "resume_from_checkpoint=true"])  # an empty output_dir: a notice, from 0
    text = capsys.readouterr().out
    assert "no complete checkpoint in" in text and "starting from step 0" in text and trainer.state.global_step == 2
    steps.clear()
    trainer = cli.train_main([config, "max_steps=4"])  # the same command again (a requeue): resumes
    assert re.search(r"resuming from \S+checkpoint-2 \(step 2\); overwrite_output_dir=true starts over",
                     capsys.readouterr().out)
    assert len(steps) == 2 and trainer.state.global_step == 4
    steps.clear()
    trainer = cli.train_main([config, "max_steps=4", "resume_from_checkpoint=false"])
    assert "resuming" not in capsys.readouterr().out and len(steps) == 4
    steps.clear()
    trainer = cli.train_main([config, "max_steps=2", "overwrite_output_dir=true"])  # an earlier run's 4 goes
    assert "removing the 2 checkpoint(s) of an earlier run" in capsys.readouterr().out and len(steps) == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    trainer = cli.train_main([config, "max_steps=2"])
    assert "nothing left to train" in capsys.readouterr().out


def test_a_second_training_run_on_one_output_dir_is_refused(tmp_path, ckpt, capsys):
    from wspo_kernels.train import storage
    paths, data = ckpt
    out = tmp_path / "out"
    config = _train_config(tmp_path, paths, data, out, "max_steps: 2")
    with storage.directory_lock(str(out)):  # another run, training there
        assert wspo_main(["train", config]) == 1
    one_line_error(capsys.readouterr().err, rf"error: output_dir {re.escape(str(out))} is in use by pid {os.getpid()}")
    assert not list(out.glob("checkpoint-*"))
    assert wspo_main(["train", config]) == 0  # the lock went with the run that held it


def test_library_precompute_keeps_other_columns_and_reuses_its_cache(tmp_path, monkeypatch):
    """Columns beside the tokens (an id string, a score) are checksummed too, and the cache is reused."""
    rows = [dict(r, id=f"row-{i}", score=float(i)) for i, r in enumerate(_rows(6))]
    ds = datasets.Dataset.from_list(rows)
    frozen = dict(ref_model=tiny(1), weak_aligned_model=tiny(2), weak_base_model=tiny(3))
    logs = []
    first = precompute_mod.precompute_logps(ds, **frozen, output_dir=str(tmp_path / "pre"), progress=False,
                                            log=logs.append)
    calls = []
    real = precompute_mod._shard_logps
    monkeypatch.setattr(precompute_mod, "_shard_logps", lambda *a: calls.append(1) or real(*a))
    again = precompute_mod.precompute_logps(ds, **frozen, output_dir=str(tmp_path / "pre"), progress=False,
                                            log=logs.append)
    assert again["id"] == first["id"] == [r["id"] for r in rows] and again["ref_logps"] == first["ref_logps"]
    assert not calls and not logs  # reused as it is, nothing recomputed


# ---------------------------------------------------------------- 8, 9. unwritable output_dir, full disk
def test_unwritable_output_dir_is_refused_before_loading(tmp_path, ckpt, capsys):
    paths, data = ckpt
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, message in ((a_file, f"'{a_file}' is a file, not a directory"),
                         (a_file / "sub", f"cannot create '{a_file / 'sub'}' (Not a directory)")):
        assert wspo_main(["train", write_config(tmp_path / "c.yaml", paths, data, out)]) == 2
        one_line_error(capsys.readouterr().err, "error: output_dir: " + re.escape(message))
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        assert wspo_main(["train", write_config(tmp_path / "c.yaml", paths, data, ro / "out")]) == 2
        one_line_error(capsys.readouterr().err, r"error: output_dir: cannot create .*Read-only file system")


class _tmpfs:
    """A small tmpfs mounted for the test (root), else the test is skipped with the reason."""

    def __init__(self, path, options):
        self.path, self.options = path, options

    def __enter__(self):
        os.makedirs(self.path, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", self.options, "tmpfs", str(self.path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
        return self.path

    def __exit__(self, *exc):
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def test_full_disk_during_precompute_is_one_line(tmp_path, ckpt, capsys):
    paths, _ = ckpt
    data = write_rows(tmp_path / "rows.jsonl", 300)
    with _tmpfs(tmp_path / "small", "size=64k") as small:
        config = write_config(tmp_path / "c.yaml", paths, data, small / "out")
        assert wspo_main(["precompute", config]) == 1
        one_line_error(capsys.readouterr().err, r"error: no space left on \S+ while writing .*\(\d+ MiB free\)")
        cache = small / "out" / "precomputed"
        leftovers = [str(p) for p in cache.rglob("*.tmp*")] + [str(p) for p in cache.glob("dataset")]
        assert not leftovers
        # Room again: the run goes on from what it kept and ends equal to a run that never failed.
    big = cli.precompute_main([write_config(tmp_path / "c2.yaml", paths, data, tmp_path / "ok")])
    assert len(big) == 300


@pytest.mark.parametrize("writer", ["safe_save_file", "_save_optimizer_and_scheduler"])
def test_full_disk_during_a_checkpoint_is_one_line(tmp_path, ckpt, capsys, monkeypatch, writer):
    """The disk fills while checkpoint-2 is written, after its config.json as the weights are written
    (safetensors: 'os error 28') or before the optimizer (torch's zip writer: 'unexpected pos'): one line
    naming the checkpoint, exit 1, no checkpoint-2 directory left."""
    import transformers.modeling_utils
    from transformers import Trainer
    paths, data = ckpt
    owner = transformers.modeling_utils if writer == "safe_save_file" else Trainer
    with _tmpfs(tmp_path / "small", "size=2m") as small:
        config = _train_config(tmp_path, paths, data, small / "out", "max_steps: 2")
        real = getattr(owner, writer)

        def fill_then_save(*a, **k):
            with open(small / "filler", "wb") as f:
                try:
                    while True:
                        f.write(bytes(1 << 16))
                        f.flush()
                except OSError:
                    pass
            return real(*a, **k)
        monkeypatch.setattr(owner, writer, fill_then_save)
        assert wspo_main(["train", config]) == 1
        one_line_error(capsys.readouterr().err, r"error: no space left on \S+ while writing checkpoint-2")
        assert not os.path.exists(small / "out" / "checkpoint-2")


def test_file_size_limit_during_precompute(tmp_path, ckpt):
    """Where no tmpfs can be mounted: RLIMIT_FSIZE (SIGXFSZ ignored, writes fail with EFBIG)."""
    paths, _ = ckpt
    data = write_rows(tmp_path / "rows.jsonl", 300)
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out")
    limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))"
    done = subprocess.run([sys.executable, "-c", f"{limit}\nexec(compile({RUNNER!r}, 'runner', 'exec'))", "none:0",
                           "precompute", config], capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    one_line_error(done.stderr, r"error: file size limit reached on \S+ while writing .*\(ulimit -f\)")
    assert not list((tmp_path / "out" / "precomputed").rglob("*.tmp*"))


# ---------------------------------------------------------------- 12, 13. found on a real model
@pytest.mark.parametrize("extra, tol", [((), 1e-7), (("finetuning_type=lora",), 1e-7), (("precompute=false",), 1e-5)])
def test_reference_logps_use_the_policys_numerics(tmp_path, ckpt, extra, tol):
    """Under bf16 the policy is the checkpoint rounded to bf16, held in fp32, run under bf16 autocast; the
    reference is computed the same way, so the strong log-ratio logged at the first step (policy ==
    reference) is 0.  A pure-bf16 reference forward gave -3e-6 here (-4.4e-3 on SmolLM2-135M).  Resident,
    the reference's logps come from the loss's frozen-model path: equal to fp32 rounding."""
    paths, data = ckpt
    config = write_config(tmp_path / "c.yaml", paths, data, tmp_path / "out", "max_steps: 1")
    trainer = cli.train_main([config, "bf16=true", *extra])
    first = next(h for h in trainer.state.log_history if "wspo/delta_strong" in h)
    assert abs(first["wspo/delta_strong"]) < tol, first
    assert abs(first["wspo/delta_weak"]) > 1e-3  # the weak pair does differ: the check can see a difference
