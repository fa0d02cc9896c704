"""``wspo-kernels`` / ``python -m wspo_kernels``: the self-check (default) and the benchmarks.

    wspo-kernels                 # = wspo-kernels check: every available backend vs the naive loss
    wspo-kernels check --tokens 2048 --vocab 32000
    wspo-kernels bench --quick   # peers vs every backend, JSON + table + plots (wspo_kernels.bench.runner)
    wspo-kernels demo [--quick]  # the end-to-end WSPO pipeline on tiny models (wspo_kernels.train.demo)
    wspo-kernels precompute|train CONFIG.yaml [key=value ...]   (wspo_kernels.train.cli; --help lists the keys)
    wspo-kernels eval CONFIG.yaml eval_dataset=pairs.jsonl      (wspo_kernels.train.evaluate: did the transfer work)
"""
import argparse
import statistics
import sys
import time

import torch

import wspo_kernels as wk
from wspo_kernels._memory import peak_extra_mib, start_window
from wspo_kernels.bench import impls
from wspo_kernels.dispatch import _AUTO_ORDER, _module, select_backend


def _naive(policy, labels, frozen, gamma):
    """The official formulation: fp32 upcast and a full log_softmax of all four logits."""
    lab, mask = impls.shifted(labels)
    lp = [impls.official_token_logps(z, lab) for z in (policy, *frozen)]
    return impls.official_reduction(*lp, mask, gamma=gamma)


def _measure(fn, params, repeat):
    for p in params:
        p.grad = None
    fn()  # warm-up (also loads code lazily)
    for p in params:
        p.grad = None
    base = start_window()
    times = []
    for _ in range(repeat):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        loss = fn()
        times.append(time.perf_counter() - t0)
    peak = peak_extra_mib(base)
    return loss, statistics.median(times), peak


def check(args):
    torch.manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    B, T, V = args.seqs, args.tokens // args.seqs, args.vocab
    print(f"wspo-kernels {wk.__version__} self-check: WSPO loss (gamma={args.gamma}) forward+backward from four "
          f"[{B}, {T}, {V}] {args.dtype} logits; torch {torch.__version__}, {torch.get_num_threads()} threads")
    from .backends import native
    print(f"  CPU capability: torch {torch.backends.cpu.get_cpu_capability()}, native kernels "
          f"{native.capability() or 'unavailable'}")
    labels = torch.randint(0, V, (B, T))
    labels[:, : T // 4] = -100  # prompt tokens
    policy = torch.randn(B, T, V, dtype=dtype).requires_grad_()
    frozen = [torch.randn(B, T, V, dtype=dtype) for _ in range(3)]
    logits_mb = policy.numel() * policy.element_size() / 2 ** 20

    def naive():
        loss = _naive(policy, labels, frozen, args.gamma)
        loss.backward()
        return loss

    rows = [("naive (official formulation)",) + _measure(naive, [policy], args.repeat)]
    reference = (rows[0][1].detach(), policy.grad.clone())
    device = torch.device("cpu")
    for name in _AUTO_ORDER["cpu"]:
        module, reason = _module(name)
        reason = reason if module is None else module.unavailable_reason(device, dtype)
        if reason is not None:
            print(f"  backend {name}: not available ({reason})")
            continue

        def ours(name=name):
            loss = wk.wspo_loss(policy, labels, ref=frozen[0], weak_aligned=frozen[1], weak_base=frozen[2],
                                gamma=args.gamma, backend=name)
            loss.backward()
            return loss
        rows.append((f"wspo_kernels backend={name}",) + _measure(ours, [policy], args.repeat))
        grad_err = (policy.grad.float() - reference[1].float()).abs().max().item()
        loss_err = abs(rows[-1][1].item() - reference[0].item()) / abs(reference[0].item())
        rows[-1] = rows[-1] + (loss_err, grad_err)
    print(f"  auto picks: {select_backend('', device, dtype).NAME}; one logits tensor = {logits_mb:.0f} MiB\n")
    print(f"| implementation | loss | median s | speed-up | peak extra MiB | x logits | loss rel. diff | grad max diff |")
    print("|---|---|---|---|---|---|---|---|")
    base_t = rows[0][2]
    for row in rows:
        name, loss, t, peak = row[:4]
        diffs = f"{row[4]:.1e} | {row[5]:.1e}" if len(row) > 4 else "- | -"
        print(f"| {name} | {loss.item():.6f} | {t:.3f} | {base_t / t:.2f}x | {peak:.0f} | {peak / logits_mb:.2f} | "
              f"{diffs} |")
    return 0


EXIT_CONFIG, EXIT_RUN, EXIT_INTERRUPTED = 2, 1, 130  # argparse's, a failed run's, the shell's for SIGINT


def _train_command(command, argv):
    """``train`` / ``precompute``: an error the user can fix is one line on stderr, no traceback: a config
    error exits 2 (like argparse), a run that cannot go on (full disk, NaN model or step) 1, Ctrl-C 130."""
    from wspo_kernels.train import cli
    prog = f"wspo-kernels {command}"
    if any(a in ("-h", "--help") for a in argv):
        print(cli.format_help(prog))
        return 0
    try:
        if command == "eval":
            from wspo_kernels.train import evaluate
            evaluate.main(argv)
        else:
            (cli.train_main if command == "train" else cli.precompute_main)(argv)
    except (cli.ConfigError, FileNotFoundError) as e:
        # Like every argparse tool: the usage line first, then the one-line error.
        _say_error(f"usage: {prog} [-h] CONFIG [key=value ...]\n{prog}: error: {e}")
        return EXIT_CONFIG
    except cli.RUN_ERRORS as e:
        _say_error(f"{prog}: error: {e}")
        return EXIT_RUN
    except cli.Interrupted as e:
        _say_error(f"{prog}: {e}")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _say_error(f"{prog}: interrupted")
        return EXIT_INTERRUPTED
    finally:
        _end_process_group()
    return 0


def _say_error(text):
    """``text`` and its newline on stderr in one write: under torchrun every rank reports, and print's two
    writes (text, then newline) let another rank's line land between them."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _end_process_group():
    """A torchrun job's process group, torn down before the interpreter exits: gloo's, left to exit,
    can abort a rank that finished its work ('terminate called without an active exception', exit -6)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from wspo_kernels.bench.runner import main as bench_main
        return bench_main(argv[1:])
    if argv[:1] == ["demo"]:
        from wspo_kernels.train.demo import main as demo_main
        return demo_main(argv[1:])
    if argv[:1] in (["train"], ["precompute"], ["eval"]):
        return _train_command(argv[0], argv[1:])
    parser = argparse.ArgumentParser(prog="wspo-kernels", description="wspo-kernels command line")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("check", help="compare every available backend with the naive loss (default)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--seqs", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    sub.add_parser("bench", help="benchmarks against the peers (wspo-kernels bench --help)")
    sub.add_parser("demo", help="the end-to-end WSPO pipeline on tiny models (wspo-kernels demo --help)")
    sub.add_parser("precompute", help="run the frozen models once: wspo-kernels precompute CONFIG.yaml [key=value ...]")
    sub.add_parser("train", help="WSPO training from the official recipe's YAML: wspo-kernels train CONFIG.yaml "
                                 "[key=value ...] (wspo-kernels train --help lists every key)")
    sub.add_parser("eval", help="did the transfer work: margins, win rates and implicit rewards of the four models on "
                                "held-out pairs: wspo-kernels eval CONFIG.yaml eval_dataset=pairs.jsonl")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["check"] + argv)
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
