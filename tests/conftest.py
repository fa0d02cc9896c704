"""Test-session setup, before anything imports triton or compiles.

- Without a GPU, the Triton kernels run under the interpreter (set before triton is imported).
- torch.compile caches go to a fresh directory: inductor's on-disk cache keys do not cover a custom
  op's fake implementation, so entries compiled against an older version of this package's ops
  (other output shapes) would be reused and fail.
"""
import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="wspo-kernels-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
