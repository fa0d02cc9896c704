"""Every Triton kernel compiles to PTX for sm_80 and sm_90 (Triton's compile API, no GPU needed): what the
interpreter cannot check.  Runs in a subprocess, as the test session imports Triton in interpreter mode."""
import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = r'''
import inspect, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from wspo_kernels.backends import triton_linear as L, triton_rows as R

DATA = {"x_ptr", "p_ptr", "r_ptr", "a_ptr", "b_ptr", "out_ptr", "grad_ptr", "h_ptr", "w_ptr"}
FLOAT = {"gamma"}

def signature(fn, dtype, overrides, constexprs):
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in overrides:
            sig[name] = overrides[name]
        elif name in constexprs:
            sig[name] = "constexpr"
        elif name in DATA:
            sig[name] = "*" + dtype
        elif name == "labels_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name in FLOAT else "i64"
    return sig

KERNELS = [
    (R._logprobs_kernel, {}, [dict(BLOCK=4096)]),
    (R._logprobs_backward_kernel, {}, [dict(BLOCK=4096, OUT_ALIGNED=a) for a in (True, False)]),
    (R._weak_log_ratio_kernel, {}, [dict(BLOCK_A=4096, BLOCK_B=2048)]),
    (R._wspo_kernel, {"k_ptr": "*fp32", "w_ptr": "*fp32"},
     [dict(FOUR=f, WRITE_GRAD=g, BLOCK=4096, BLOCK_F=4096, OUT_ALIGNED=g) for f in (True, False)
      for g in (True, False)]),
    (R._scale_rows_kernel, {"g_ptr": "*{dtype}"}, [dict(BLOCK=4096)]),
    (L._stats_kernel, {}, [dict(HAS_BIAS=b, BLOCK_M=64, BLOCK_V=128, BLOCK_K=32, IEEE=i)
                           for b in (True, False) for i in (True, False)]),
    (L._grad_kernel, {}, [dict(HAS_BIAS=True, GRAD_H=True, GRAD_W=True, BLOCK_M=64, BLOCK_V=128, BLOCK_K=32, IEEE=False,
                              GROUP_M=L.GROUP_M)]),
]
count = 0
for arch, dtype in ((80, "bf16"), (90, "bf16"), (90, "fp32")):
    for fn, overrides, variants in KERNELS:
        ov = {k: v.format(dtype=dtype) for k, v in overrides.items()}
        for constexprs in variants:
            if fn in (L._stats_kernel, L._grad_kernel) and constexprs.get("IEEE") and dtype != "fp32":
                continue
            src = ASTSource(fn=fn, signature=signature(fn, dtype, ov, constexprs), constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            assert ".entry" in compiled.asm["ptx"], fn.fn.__name__
            count += 1
print("compiled", count)

# V = 32001 (odd strides, nothing divisible but the base pointer): the full blocks still load and store
# 16-byte vectors, thanks to the peeled head; the in-place gradient's stores too.
for fn, extra in ((R._logprobs_kernel, {}), (R._logprobs_backward_kernel, dict(OUT_ALIGNED=True))):
    names = list(inspect.signature(fn.fn).parameters)
    constexprs = dict(BLOCK=4096, **extra)
    attrs = {(names.index(p),): [["tt.divisibility", 16]] for p in ("x_ptr", "out_ptr") if p in names}
    src = ASTSource(fn=fn, signature=signature(fn, "bf16", {}, constexprs), constexprs=constexprs, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert any("ld.global" in l and ".v4" in l for l in ptx.splitlines()), fn.fn.__name__ + ": no vector loads"
    if extra:
        assert any("st.global" in l and ".v4" in l for l in ptx.splitlines()), "no vector stores"
print("vectorised")
'''


def test_every_triton_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("Triton's bundled ptxas is not available here")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "compiled" in out.stdout and "vectorised" in out.stdout
