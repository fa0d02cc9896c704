"""Tiny random Llama models, examples and on-disk checkpoints for the trainer and CLI tests (nothing downloaded)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from wspo_kernels.train.data import build_example

VOCAB = 48


def tiny(seed, tie=False, **config):
    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, tie_word_embeddings=tie), **config})
    return LlamaForCausalLM(config)


def examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(1, VOCAB, (2 + i % 3,), generator=g).tolist()
        r = torch.randint(1, VOCAB, (1 + (i * 2) % 5,), generator=g).tolist()
        out.append(build_example(p, r))
    return out


def frozen_models():
    return dict(ref_model=tiny(1), weak_aligned_model=tiny(2), weak_base_model=tiny(3))


def save_tiny_checkpoints(tmp_path, **config):
    """A word-level tokenizer and four tiny models saved to disk: what the CLI loads instead of Hub names."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    paths = {}
    for name, seed in (("policy", 0), ("weak_aligned", 2), ("weak_base", 3)):
        paths[name] = str(tmp_path / name)
        tiny(seed, **config).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    data = tmp_path / "data.jsonl"
    g = torch.Generator().manual_seed(0)
    with open(data, "w") as f:
        for i in range(12):
            words_p = " ".join(f"w{int(j)}" for j in torch.randint(0, VOCAB - 4, (3,), generator=g))
            words_r = " ".join(f"w{int(j)}" for j in torch.randint(0, VOCAB - 4, (1 + i % 4,), generator=g))
            f.write(f'{{"prompt": "{words_p}", "response": "{words_r}"}}\n')
    return paths, str(data)




def write_config(path, paths, data, out, *extra):
    """A CLI config on the tiny checkpoints: two steps of 4 rows in fp32 on the CPU, no checkpoints."""
    lines = [f"model_name_or_path: {paths['policy']}", f"weak_aligned_model: {paths['weak_aligned']}",
             f"weak_base_model: {paths['weak_base']}", f"dataset: {data}", f"output_dir: {out}", "use_cpu: true",
             "bf16: false", "max_steps: 2", "per_device_train_batch_size: 4", "gradient_accumulation_steps: 1",
             "cutoff_len: 8", "logging_steps: 1", "save_strategy: 'no'", *extra]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def words(n, start=0):
    return " ".join(f"w{(start + i) % (VOCAB - 4)}" for i in range(n))


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
