"""pytest-benchmark microbenchmarks (`pytest benchmarks/ --benchmark-only`): small, in-process shapes.

For the sweep with peers, peak memory per process and plots use `wspo-kernels bench`.
"""
import pytest
import torch

import wspo_kernels as wk
from wspo_kernels.bench import impls, runner

CASES = ["logits:1024x32000:fp32", "linear:1024x512x32000:fp32", "logps:2048x32000:fp32"]


def _params():
    out = []
    for spec in CASES:
        case = runner.parse_case(spec)
        for impl in impls.IMPLS[case["kind"]]:
            reason = impls.available(impl, torch.device("cpu"), runner.DTYPES[case["dtype"]])
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            out.append(pytest.param(case, impl, id=f"{spec}-{impl}", marks=marks))
    return out


@pytest.mark.parametrize("case,impl", _params())
def test_step(benchmark, case, impl):
    x = runner.make_inputs(case, torch.device("cpu"))
    step = impls.IMPLS[case["kind"]][impl](x)

    def run():
        for p in x["params"]:
            p.grad = None
        step()
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)


def test_loss_agrees_with_official():
    """The benchmarked implementations compute the same loss (a benchmark of a wrong answer is worthless)."""
    x = runner.make_inputs(runner.parse_case("logits:1024x1000:fp32"), torch.device("cpu"))
    lab, mask = impls.shifted(x["labels"])
    lp = [impls.official_token_logps(z, lab) for z in (x["policy"], *x["frozen"])]
    official = impls.official_reduction(*lp, mask)
    ours = wk.wspo_loss(x["policy"], x["labels"], ref=x["frozen"][0], weak_aligned=x["frozen"][1],
                        weak_base=x["frozen"][2], gamma=impls.GAMMA)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind,spec", [("linear", "linear:64x16x300:fp32"), ("logits", "logits:64x300:fp32")])
def test_every_implementation_computes_the_official_gradient(kind, spec):
    """Peers and ours, as benchmarked, give the official formulation's parameter gradients."""
    case = runner.parse_case(spec)
    x = runner.make_inputs(case, torch.device("cpu"))
    grads = {}
    for impl, factory in impls.IMPLS[kind].items():
        if impls.available(impl, torch.device("cpu"), runner.DTYPES[case["dtype"]]) is not None:
            continue
        for p in x["params"]:
            p.grad = None
        source = {k: ([t.clone() for t in v] if isinstance(v, list) else v) for k, v in x.items()}
        if kind == "logits":  # in-place variants overwrite the policy logits
            source["policy"] = x["policy"].detach().clone().requires_grad_()
            source["params"] = [source["policy"]]
        else:
            source["params"] = x["params"]
            source["hidden"][0], source["weights"][0] = x["hidden"][0], x["weights"][0]
        factory(source)()
        grads[impl] = [p.grad.clone() for p in source["params"]]
    for impl, got in grads.items():
        for a, b in zip(got, grads["official"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, impl=impl: f"{impl}: {m}")
