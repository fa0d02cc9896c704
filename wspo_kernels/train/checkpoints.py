"""Which ``checkpoint-N`` directories can be resumed from.

The Trainer writes a checkpoint file by file into its final directory, so a kill, a Ctrl-C or a full disk
mid-save leaves a directory that looks like a checkpoint by its name.  ``WSPOTrainer`` therefore opens
every checkpoint it writes with a marker, ``wspo_writing``, and closes it, once every rank has written its
part and every file is flushed to disk, with a record, ``wspo_complete.json`` (each file's size); only a
directory whose record matches its files is taken:

- ``latest_complete(output_dir)``: the newest complete checkpoint (what ``resume_from_checkpoint: true``
  and the CLI's automatic resume take); incomplete ones are skipped, with the reason.
- ``remove_incomplete(output_dir)``: deletes them before training writes new ones beside them (the
  Trainer's ``save_total_limit`` rotation counts every ``checkpoint-*`` directory).

A checkpoint with neither marker nor record (written by plain ``transformers.Trainer`` or an older
version) is taken when its ``trainer_state.json``, which the Trainer writes last, loads.
"""
import contextlib
import os
import re
import shutil

from . import storage

COMPLETE_FILE = "wspo_complete.json"
WRITING_FILE = "wspo_writing"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _files(path):
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path)
            if rel not in (COMPLETE_FILE, WRITING_FILE):
                out[rel] = os.path.getsize(full)
    return out


def mark_writing(path):
    """Open the checkpoint at ``path``: until its record is written, it is incomplete whatever it holds."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, WRITING_FILE), "w"):
        pass


def mark_complete(path, global_step):
    """Flush every file of the checkpoint at ``path`` to disk, then record it as complete."""
    with storage.writing(path, f"checkpoint {os.path.basename(path)}"):
        storage.fsync_tree(path)
    storage.write_json_atomically(os.path.join(path, COMPLETE_FILE),
                                  {"global_step": global_step, "files": _files(path)})
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, WRITING_FILE))


def why_incomplete(path):
    """None when the checkpoint at ``path`` is complete, else the reason (one phrase)."""
    if not os.path.isdir(path):
        return "not a directory"
    record = storage.read_json(os.path.join(path, COMPLETE_FILE))
    if record is None:
        if os.path.exists(os.path.join(path, COMPLETE_FILE)):
            return f"its {COMPLETE_FILE} is damaged"
        if os.path.exists(os.path.join(path, WRITING_FILE)):
            return "interrupted while it was written"
        state = storage.read_json(os.path.join(path, TRAINER_STATE))
        if not isinstance(state, dict) or "global_step" not in state:
            return f"no {COMPLETE_FILE} and no whole {TRAINER_STATE} (interrupted while it was written)"
        return None  # written without a record: trainer_state.json, written last, is whole
    files = _files(path)
    for name, size in record.get("files", {}).items():
        if name not in files:
            return f"{name} is missing"
        if files[name] != size:
            return f"{name} holds {files[name]} bytes, {size} were written"
    return None


def global_step(path):
    state = storage.read_json(os.path.join(path, TRAINER_STATE)) or {}
    return state.get("global_step")


def checkpoint_dirs(output_dir):
    """[(step, path)] of the ``checkpoint-N`` directories in ``output_dir``, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return sorted(found, reverse=True)


def latest_complete(output_dir, *, log=None):
    """The newest complete checkpoint in ``output_dir``, or None; ``log`` names each newer one skipped."""
    for _, path in checkpoint_dirs(output_dir):
        reason = why_incomplete(path)
        if reason is None:
            return path
        if log is not None:
            log(f"{path} is incomplete ({reason}): not resuming from it")
    return None


def remove_all(output_dir, *, log=None):
    """Every ``checkpoint-N`` of ``output_dir`` removed (``overwrite_output_dir``: an earlier run's would be
    resumed from, and would outlive the new run's under ``save_total_limit``)."""
    found = checkpoint_dirs(output_dir)
    if found and log is not None:
        log(f"overwrite_output_dir: removing the {len(found)} checkpoint(s) of an earlier run in {output_dir}")
    for _, path in found:
        shutil.rmtree(path, ignore_errors=True)


def remove_incomplete(output_dir, *, log=None):
    for _, path in checkpoint_dirs(output_dir):
        reason = why_incomplete(path)
        if reason is not None:
            if log is not None:
                log(f"removing the incomplete {path} ({reason})")
            shutil.rmtree(path, ignore_errors=True)
