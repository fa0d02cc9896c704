"""The ``wspo-kernels train`` / ``precompute`` configuration, validated before anything is loaded.

A config is a YAML file -- the official recipe's own (``examples/train_full/qwen2_full_wspo_ds3.yaml``,
with ``dataset`` a local file) works unchanged -- plus ``key=value`` / ``--key value`` overrides on the
command line.  Keys are the fields of ``WSPOArguments`` (models, data, method) and of transformers'
``TrainingArguments``; ``transformers.HfArgumentParser`` parses them (types, choices, ``--help``).
Defaults when a key is absent are the official recipe's (``RECIPE_DEFAULTS``), not Hugging Face's.

Checked before any model or dataset is loaded: unknown keys (with the closest valid name), types,
ranges, that the config, dataset and local model directories exist, and version differences of
``TrainingArguments`` (``warmup_ratio`` is ``warmup_steps < 1`` in transformers 5).
"""
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Optional

from .data import TRUNCATIONS


def _key(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class WSPOArguments:
    """Models, data and method: the official recipe's names (aliases: ``ALIASES``)."""
    model_name_or_path: Optional[str] = _key(None, "the strong model to train (local directory or Hub id); also "
                                                   "the reference unless ref_model is set (alias: policy)")
    ref_model: Optional[str] = _key(None, "strong reference; default: the policy's initial weights (alias: ref)")
    weak_aligned_model: Optional[str] = _key(None, "the aligned weak model (alias: weak_aligned)")
    weak_base_model: Optional[str] = _key(None, "the weak model before alignment (alias: weak_base)")
    stage: str = _key("wspo", "the official recipe's stage; only 'wspo'", choices=["wspo"])
    pref_beta: float = _key(0.1, "the paper's gamma, the weight of the strong log-ratio (alias: gamma)")
    pref_loss: str = _key("sigmoid", "accepted for the official YAML; the WSPO loss does not use it",
                          choices=["sigmoid"])
    finetuning_type: str = _key("full", "full or lora (PEFT)", choices=["full", "lora"])
    lora_rank: int = _key(8, "LoRA rank")
    lora_alpha: Optional[int] = _key(None, "LoRA alpha; default 2 * lora_rank")
    lora_dropout: float = _key(0.0, "LoRA dropout (disabled during training with disable_dropout)")
    lora_target: str = _key("all", "comma-separated module names, or 'all' (every linear layer but the head)")
    pure_bf16: bool = _key(False, "with bf16: keep the trainable parameters in bf16 (default: fp32, as the "
                                  "official init_adapter does)")
    disable_dropout: bool = _key(True, "dropout off in the policy and the frozen models (as the official trainer)")
    dataset: Optional[str] = _key(None, "a local JSON / JSONL file or datasets directory: prompt/response, "
                                        "prompt/chosen(/rejected), Alpaca instruction/input/output or chat messages")
    template: str = _key("auto", "'plain': no chat template; anything else ('auto', or an official template "
                                 "name such as 'qwen'): the tokenizer's own chat template when it has one")
    cutoff_len: int = _key(4096, "maximum tokens per example (prompt + response); capped at the models' context")
    truncation: str = _key("infer_seqlen", "infer_seqlen (official: keep the start of prompt and response, split "
                                           "cutoff_len) or prompt_left (keep the end of the prompt)",
                           choices=list(TRUNCATIONS))
    max_samples: Optional[int] = _key(None, "use the first max_samples examples")
    val_size: float = _key(0.0, "held-out evaluation split: a fraction in [0, 1) or a number of examples")
    plot_loss: bool = _key(False, "save the training loss curve as training_loss.png in output_dir")
    precompute: bool = _key(True, "run the frozen models once and train with none resident (the cache in "
                                  "output_dir/precomputed is fingerprinted and reused)")
    precompute_batch_size: int = _key(8, "most rows per batch of the precompute pass")
    precompute_batch_tokens: int = _key(16384, "padded tokens per batch of the precompute pass: rows run longest "
                                               "first in batches of similar lengths (little padding), at most "
                                               "precompute_batch_size rows; must hold the longest row")
    backend: Optional[str] = _key(None, "loss backend (auto, torch, native, triton)")
    padding_free: bool = _key(False, "pack each micro-batch's rows into one sequence instead of padding them: "
                                     "position_ids restart per row and the sequences never attend to each other "
                                     "(alias: neat_packing; LLaMA-Factory's packing, which lets them, is refused)")
    stop_on_nonfinite: bool = _key(True, "stop training, before the optimizer step and saving nothing, when a step's "
                                         "loss or gradient norm is NaN / inf")
    precompute_dir: Optional[str] = _key(None, "the logps cache's directory (default: output_dir/precomputed); runs of "
                                               "a gamma sweep can share one")
    eval_dataset: Optional[str] = _key(None, "wspo-kernels eval: held-out preference pairs (prompt, chosen, rejected), "
                                             "in any format train reads")
    eval_checkpoints: Optional[str] = _key(None, "wspo-kernels eval: 'all' (every complete checkpoint-* of output_dir) or "
                                                 "comma-separated checkpoint directories, scored beside the final model")
    eval_runs: Optional[str] = _key(None, "wspo-kernels eval: comma-separated output_dirs of other runs (a gamma or "
                                          "weak-model sweep) whose policies are scored beside this one")
    eval_batch_tokens: int = _key(16384, "wspo-kernels eval: padded tokens per forward (rows are batched by length)")


ALIASES = {"policy": "model_name_or_path", "ref": "ref_model", "weak_aligned": "weak_aligned_model",
           "weak_base": "weak_base_model", "gamma": "pref_beta", "neat_packing": "padding_free"}
# Official-recipe keys refused when true: what they do would silently change the method.
REFUSED = {"packing": "packing: true (LLaMA-Factory) lets the sequences packed into one row attend to each other, "
                      "which changes every logp WSPO regresses on: use padding_free: true (LLaMA-Factory's "
                      "neat_packing), which packs them without cross-attention"}
# Official-recipe keys that have no effect here (accepted so that its YAML runs unchanged).
IGNORED = {"overwrite_cache": "the logps cache is fingerprinted and checksummed instead",
           "preprocessing_num_workers": "tokenisation runs in the main process"}
# LLaMA-Factory's key (a TrainingArguments field before transformers 5): by default a rerun resumes from
# the newest complete checkpoint in output_dir; overwrite_output_dir: true starts over.
OVERWRITE = "overwrite_output_dir"
# warmup_ratio: a TrainingArguments field before transformers 5, a float warmup_steps < 1 since.
WARMUP_RATIO = 0.1
REQUIRED = ("model_name_or_path", "weak_aligned_model", "weak_base_model", "dataset", "output_dir")
EVAL_REQUIRED = ("model_name_or_path", "weak_aligned_model", "weak_base_model", "eval_dataset", "output_dir")
# The official recipe's values (examples/train_full/qwen2_full_wspo_ds3.yaml) for TrainingArguments.
RECIPE_DEFAULTS = dict(per_device_train_batch_size=1, gradient_accumulation_steps=4, learning_rate=1e-5,
                       num_train_epochs=1.0, lr_scheduler_type="cosine", bf16=True, logging_steps=10, save_steps=1000,
                       eval_steps=1000, per_device_eval_batch_size=1, report_to="none")


class ConfigError(ValueError):
    """A config that cannot run; the message says which key and why."""


@dataclass
class Config:
    wspo: WSPOArguments
    training: "object"  # transformers.TrainingArguments
    overwrite_output_dir: bool = False  # start over instead of resuming from output_dir's last checkpoint


def _parser(prog="wspo-kernels train"):
    from transformers import HfArgumentParser, TrainingArguments

    class Parser(HfArgumentParser):
        def error(self, message):  # a ConfigError instead of SystemExit, for library callers
            raise ConfigError(message)

    parser = Parser((WSPOArguments, TrainingArguments), prog=prog,
                    usage=f"{prog} [CONFIG.yaml] [key=value | --key value ...]",
                    description="Keys come from CONFIG.yaml, then from the command line; defaults are the "
                                f"official WSPO recipe's. Also: --warmup_ratio (default {WARMUP_RATIO}; "
                                "transformers >= 5 takes it as warmup_steps < 1); --overwrite_output_dir (default "
                                "false: a rerun resumes from the newest complete checkpoint in output_dir; true "
                                "starts over); accepted and without effect: "
                                + ", ".join(f"{k} ({why})" for k, why in IGNORED.items()) + ".")
    defaults = dict(RECIPE_DEFAULTS, use_cpu=not _has_accelerator())  # bf16 on a CPU-only machine needs use_cpu
    parser.set_defaults(**{k: v for k, v in defaults.items() if k in _training_fields()})
    return parser


def _has_accelerator():
    import torch
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _training_fields():
    from transformers import TrainingArguments
    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def parse_overrides(argv):
    """``key=value``, ``--key=value``, ``--key value`` and ``--flag`` (= true) -> {key: str}."""
    out, i = {}, 0
    while i < len(argv):
        item = argv[i]
        key, eq, value = item.lstrip("-").partition("=")
        if not eq and item.startswith("--"):
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--") and "=" not in argv[i + 1]
            value = argv[i + 1] if has_value else "true"
            i += has_value
        elif not eq:
            raise ConfigError(f"unexpected argument {item!r}: overrides are key=value or --key value")
        out[key.replace("-", "_")] = value
        i += 1
    return out


def read_yaml(path):
    import yaml
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r}: no such file")
    with open(path) as f:
        try:
            config = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(config).__name__}")
    return config


def _truthy(value):
    return value is True or str(value).lower() in ("true", "1", "yes")


def _normalise(raw: dict) -> dict:
    """Aliases resolved (``no_X`` = ``X: false`` for a boolean X), unknown keys and nested mappings that are
    not a ``TrainingArguments`` dict field refused with the closest valid names."""
    wspo_fields = {f.name: f for f in dataclasses.fields(WSPOArguments)}
    training_fields = _training_fields()
    known = set(wspo_fields) | set(training_fields) | {"warmup_ratio", OVERWRITE}
    every_field = {**wspo_fields, **training_fields}
    out, origin = {}, {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        flag = every_field.get(name[3:]) if name.startswith("no_") else None
        if flag is not None and flag.type in (bool, "bool"):
            name, value = name[3:], not _truthy(value)
        if isinstance(value, dict) and name not in training_fields:
            hints = [m for sub in value for m in difflib.get_close_matches(f"{key}_{sub}", known, n=1)]
            raise ConfigError(f"key {key!r}: nested mappings are not keys here; keys are flat"
                              + (f" (did you mean {', '.join(hints)}?)" if hints else ""))
        if name in IGNORED and name not in training_fields:
            continue
        if name in REFUSED and name not in known:
            if _truthy(value):
                raise ConfigError(REFUSED[name])
            continue
        if name not in known:
            close = difflib.get_close_matches(key, sorted(known | set(ALIASES)), n=1)
            raise ConfigError(f"unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                              + " (`wspo-kernels train --help` lists every key)")
        if name in out:
            raise ConfigError(f"{origin[name]!r} and {key!r} are the same key: give one")
        out[name], origin[name] = value, key
    return out


def _as_argv(values: dict, parser):
    """(argv for the parser, structured values): lists and mappings of ``TrainingArguments`` keys
    (``report_to: [a, b]``, ``lr_scheduler_kwargs: {...}``) are set on the parsed dataclass as they are;
    a list for one of our string keys (``lora_target``) is joined with commas."""
    actions = {a.dest: a for a in parser._actions}
    training_fields = _training_fields()
    argv, structured = [], {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        if isinstance(value, (list, tuple, dict)):
            if key in training_fields and not (isinstance(value, (list, tuple)) and actions[key].nargs in ("+", "*")):
                structured[key] = list(value) if isinstance(value, tuple) else value
                continue
            if isinstance(value, (list, tuple)):
                items = [str(v) for v in value]
                argv += [f"--{key}"] + (items if actions[key].nargs in ("+", "*") else [",".join(items)])
                continue
        argv += [f"--{key}", str(value)]
    return argv, structured


def _check_ranges(w: WSPOArguments, t):
    from .._inputs import check_gamma
    try:
        check_gamma(w.pref_beta)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"pref_beta: {e}") from None
    checks = [
        (w.cutoff_len >= 2, "cutoff_len must be >= 2 (a prompt token and a response token)"),
        (w.max_samples is None or w.max_samples >= 1, "max_samples must be >= 1"),
        (w.val_size >= 0 and (w.val_size < 1 or float(w.val_size).is_integer()),
         "val_size must be a fraction in [0, 1) or a whole number of examples"),
        (w.lora_rank >= 1, "lora_rank must be >= 1"),
        (w.lora_alpha is None or w.lora_alpha > 0, "lora_alpha must be > 0"),
        (0 <= w.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
        (w.precompute_batch_size >= 1, "precompute_batch_size must be >= 1"),
        (w.precompute_batch_tokens >= 1, "precompute_batch_tokens must be >= 1"),
        (w.eval_batch_tokens >= 1, "eval_batch_tokens must be >= 1"),
        (t.learning_rate > 0, "learning_rate must be > 0"),
        (t.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
        (t.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
        (t.num_train_epochs > 0 or t.max_steps > 0, "num_train_epochs or max_steps must be > 0"),
        (str(t.eval_strategy).split(".")[-1].lower() == "no" or w.val_size > 0,
         "eval_strategy needs an evaluation split: set val_size > 0"),
        (not (w.pure_bf16 and not t.bf16), "pure_bf16 needs bf16: true"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if isinstance(t.resume_from_checkpoint, str):  # True: the newest complete one, if any (cli.resume_point)
        from .checkpoints import why_incomplete
        reason = why_incomplete(t.resume_from_checkpoint)
        if reason is not None:
            state = reason if reason == "not a directory" else f"incomplete ({reason})"
            raise ConfigError(f"resume_from_checkpoint: {t.resume_from_checkpoint!r} is {state}")


def check_writable_dir(key, path):
    """``path`` is (or can be made) a directory this process can write in; else one line naming why."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{key}: {path!r} is a file, not a directory") from None
    except OSError as e:
        raise ConfigError(f"{key}: cannot create {path!r} ({e.strerror or e})") from None
    import tempfile
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".wspo-write-check")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write in {path!r} ({e.strerror or e})") from None


def _check_deepspeed(value):
    import importlib.util
    if not value:
        return
    if isinstance(value, str) and not os.path.isfile(value):
        raise ConfigError(f"deepspeed: config file {value!r} not found (deepspeed= runs without DeepSpeed)")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("deepspeed is set but DeepSpeed is not installed (pip install deepspeed; deepspeed= runs "
                          "without it)")


HUB_CHECK_TIMEOUT_S = 10


def check_model_source(key: str, name: str) -> None:
    """A local directory with a config.json, a Hub id in the local Hub cache, or one the Hub has (one
    request); anything else fails at once, not after the Hub client's connection retries."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ConfigError(f"{key}: {name!r} is a directory without a config.json (not a saved model)")
        return
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, RepositoryNotFoundError, validate_repo_id
    parent = os.path.dirname(os.path.abspath(name))
    close = difflib.get_close_matches(os.path.basename(name), os.listdir(parent), n=1) if os.path.isdir(parent) else []
    local = f"no such model directory {name!r}" + (
        f" (did you mean {os.path.join(os.path.dirname(name), close[0])!r}?)" if close else "")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"{key}: {local}") from None
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ConfigError(f"{key}: {local}, and {name!r} is not in the Hub cache (HF_HUB_OFFLINE is set)")
    try:
        model_info(name, timeout=HUB_CHECK_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}: {local}, nor a model on the Hugging Face Hub") from None
    except Exception as e:  # no network, a proxy, a timeout
        raise ConfigError(f"{key}: {local}, and the Hugging Face Hub cannot be reached to fetch it "
                          f"({type(e).__name__})") from None


def parse_config(argv, *, prog="wspo-kernels train", required=REQUIRED, paths=("dataset", "eval_dataset")) -> Config:
    """``[CONFIG.yaml] [overrides...]`` -> a validated ``Config``; raises ``ConfigError``.  ``paths``: the
    data keys that must exist when given."""
    argv = list(argv)
    is_file = argv and not argv[0].startswith("-") and (os.path.isfile(argv[0]) or "=" not in argv[0])
    raw = read_yaml(argv.pop(0)) if is_file else {}
    from_file, from_line = _normalise(raw), _normalise(parse_overrides(argv))
    # The command line wins, also over the other key of an exclusive pair.
    for a, b in (("warmup_ratio", "warmup_steps"), ("warmup_steps", "warmup_ratio")):
        if a in from_line:
            from_file.pop(b, None)
    for a, b in (("fp16", "bf16"), ("bf16", "fp16")):
        if _truthy(from_line.get(a)):
            from_file.pop(b, None)
    given = {**from_file, **from_line}
    missing = [k for k in required if given.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (in the YAML or as key=value)")
    values = dict(given)
    overwrite = _truthy(values.pop(OVERWRITE, False))
    if "warmup_ratio" in given and "warmup_steps" in given:
        raise ConfigError("give warmup_ratio or warmup_steps, not both")
    if _truthy(given.get("fp16")) and "bf16" not in given:
        values["bf16"] = False  # the recipe's bf16 default gives way to fp16
    ratio = values.pop("warmup_ratio", None if "warmup_steps" in given else WARMUP_RATIO)
    if ratio is not None:
        try:
            ratio = float(ratio)
        except (TypeError, ValueError):
            raise ConfigError(f"warmup_ratio must be a number in [0, 1), got {ratio!r}") from None
        if not 0 <= ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {ratio}")
        values["warmup_ratio" if "warmup_ratio" in _training_fields() else "warmup_steps"] = ratio
    _check_deepspeed(values.get("deepspeed"))  # before TrainingArguments, which imports it
    parser = _parser(prog)
    argv, structured = _as_argv(values, parser)
    try:
        w, t = parser.parse_args_into_dataclasses(args=argv)
        if structured:
            t = dataclasses.replace(t, **structured)
    except ConfigError:
        raise
    except (ValueError, TypeError, ImportError) as e:  # TrainingArguments' own checks
        raise ConfigError(str(e)) from None
    if isinstance(t.resume_from_checkpoint, str) and t.resume_from_checkpoint.lower() in ("true", "false"):
        t.resume_from_checkpoint = t.resume_from_checkpoint.lower() == "true"  # True: the latest; False: start over
    _check_ranges(w, t)
    from .trainer import groups_by_length
    if w.padding_free and groups_by_length(t):
        raise ConfigError("padding_free and group_by_length: group_by_length batches rows of similar lengths to cut "
                          "padding; packed batches have none: drop group_by_length")
    check_writable_dir("output_dir", t.output_dir)
    for key in ("model_name_or_path", "ref_model", "weak_aligned_model", "weak_base_model"):
        if getattr(w, key):
            check_model_source(key, getattr(w, key))
    for key in paths:
        path = getattr(w, key)
        if path and not os.path.exists(path):
            raise ConfigError(f"{key}: {path!r} is not a local file or directory (a JSON / JSONL file or a "
                              "datasets directory; the official recipe's dataset names refer to LLaMA-Factory's "
                              "dataset_info.json: pass the file instead)")
    return Config(w, t, overwrite_output_dir=overwrite)


def format_help(prog="wspo-kernels train") -> str:
    return _parser(prog).format_help()
