"""What the CLI writes to disk, written so that a job may die at any instant.

- ``writing(path, what)``: a full disk (or quota, or file-size limit) while writing ``what`` becomes one
  ``StorageError`` line -- "no space left on <path> while writing <what>" -- instead of an OSError deep in
  pyarrow, torch's zip writer (which reports ENOSPC as "unexpected pos ...") or safetensors.
- ``write_json_atomically``: a small record (fingerprint, checksums, file-hash memo) is either the old one
  or the new one, never a torn file.
- ``directory_lock``: one writer per cache directory (``flock``; a second run waits, saying who holds it,
  rather than interleaving its shards with the first's).  Readers take it shared.
- ``fsync_tree``: a checkpoint's files are on disk before the record that calls it complete.
"""
import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile

SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# Writers that lose the errno: torch.save's zip writer (a RuntimeError: "unexpected pos ..."), and
# safetensors (SafetensorError: "... No space left on device (os error 28)").
WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed", "os error 28", "os error 122",
                  "os error 27", "No space left on device")
# flock unsupported (Lustre without -o flock, some NFS setups): warn and go on without the lock; the logps
# cache still re-reads its fingerprint before committing.
LOCK_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}
LOW_SPACE_BYTES = 64 << 20
LOCK_FILE = ".lock"


def say(message):
    """One line of the CLI's own output (the prefix every message of train / precompute / eval carries)."""
    print(f"wspo-kernels: {message}", flush=True)


class StorageError(RuntimeError):
    """Something could not be written; the message says what, where and why, in one line."""


def _existing_parent(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _free_bytes(path):
    try:
        return shutil.disk_usage(_existing_parent(path)).free
    except OSError:
        return None


def space_message(path, what, error=None):
    free = _free_bytes(path)
    if (isinstance(error, OSError) and error.errno == errno.EFBIG) or "os error 27" in str(error):
        return f"file size limit reached on {path} while writing {what} (ulimit -f)"
    left = f" ({free >> 20} MiB free)" if free is not None else ""
    return f"no space left on {path} while writing {what}{left}"


@contextlib.contextmanager
def writing(path, what):
    """Space errors while writing ``what`` under ``path`` -> ``StorageError`` (the cause kept as __cause__)."""
    try:
        yield
    except OSError as e:
        if e.errno in SPACE_ERRNOS:
            raise StorageError(space_message(path, what, e)) from e
        raise StorageError(f"cannot write {what} to {path}: {e.strerror or e}") from e
    except Exception as e:
        if isinstance(e, StorageError) or not any(s in str(e) for s in WRITE_FAILURES):
            raise
        free = _free_bytes(path)
        if "os error" in str(e) or (free is not None and free < LOW_SPACE_BYTES):
            raise StorageError(space_message(path, what, e)) from e
        raise StorageError(f"cannot write {what} to {path}: {str(e).splitlines()[0]}") from e


def write_json_atomically(path, value):
    folder = os.path.dirname(path) or "."
    tmp = None
    try:
        with writing(folder, os.path.basename(path)):
            # A unique name: processes on two nodes may share a pid and write the same record.
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(value, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def read_json(path):
    """The record at ``path``, or None when it is missing or not valid JSON (a torn or foreign file)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fsync_tree(root):
    """Every file under ``root``, and the directories, flushed to the disk."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)
    _fsync_dir(os.path.dirname(os.path.abspath(root)))


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


class Locked(StorageError):
    """Another process holds the lock and the caller asked not to wait."""


@contextlib.contextmanager
def directory_lock(directory, *, shared=False, wait=True, log=None, what="this directory"):
    """An advisory lock on ``directory`` for the block (created if needed).  When another process holds
    it, ``log`` says which (pid and host, as it recorded them) and the call waits (``wait=False``: raises
    ``Locked``): a suspended run (SIGSTOP) keeps its lock, and the kernel drops it when that run dies,
    however it dies.  Where the filesystem has no locks, or a reader cannot create the lock file (a
    read-only cache), the block runs unlocked, with a warning."""
    say = log or (lambda message: None)
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if shared and os.path.isdir(directory):
            say(f"{what}: cannot create its lock file ({e.strerror}); reading it unlocked")
            yield
            return
        raise StorageError(f"cannot write {what}: {e.strerror or e}") from e
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            if not wait:
                raise Locked(f"{what} is in use by {holder}") from None
            say(f"{what} is in use by {holder}; waiting for it to finish")
            fcntl.flock(fd, mode)
        except OSError as e:
            if e.errno not in LOCK_UNSUPPORTED:
                raise StorageError(f"cannot lock {what}: {e.strerror or e}") from e
            say(f"{what}: this filesystem has no file locks ({e.strerror}); going on unlocked: do not start a second "
                "run on it")
        if not shared:  # who holds it, for the message of a run that has to wait
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
