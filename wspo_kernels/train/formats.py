"""Reading the preference / instruction data users have, as (prompt, response) pairs.

Files: a JSON array (pretty-printed or not), JSON Lines, or a ``datasets`` directory
(``save_to_disk``; a ``DatasetDict`` uses its ``train`` split).  Rows, by their keys:

| keys | prompt | response |
|---|---|---|
| ``prompt``, ``response`` | ``prompt`` | ``response`` |
| ``prompt`` or ``instruction``, ``chosen`` (``rejected`` ignored) | the prompt | ``chosen``: WSPO uses only the preferred half, as the official recipe does |
| Alpaca ``instruction``, ``input``, ``output`` | ``instruction`` + newline + ``input`` | ``output`` |
| chat ``messages`` (or ``conversations``) | every message before the last | the last message (assistant) |

A row with ``chosen`` is a preference row whatever else it carries: UltraFeedback-binarized rows hold
``prompt``, ``chosen``, ``rejected`` *and* ``messages`` (the chosen chat again), and are read from
``chosen`` / ``rejected``, so that the rejected response budgets the truncation as the official processor does.

``chosen`` may itself be a chat: a whole conversation (UltraFeedback-binarized: ``[user, assistant]``,
whose messages before the last are the prompt) or TRL's conversational form (``prompt`` a list of
messages, ``chosen`` ``[assistant]``).  An optional ``system`` string becomes a system message.  Chat
prompts go through the tokenizer's chat template (see ``data.encode_prompt_response``).  The rejected
response is returned too: the official truncation budgets the longer of the pair.
"""
import json
import os

FORMATS = ("prompt/response", "prompt/chosen(/rejected)", "instruction/input/output (Alpaca)", "messages (chat)")
RESPONSE_KEYS = ("response", "chosen", "output")


def read_records(path: str):
    """The rows of a JSON / JSONL file or a ``datasets`` directory (a list of dicts or a ``Dataset``)."""
    if os.path.isdir(path):
        from datasets import DatasetDict, load_from_disk
        ds = load_from_disk(path)
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        return ds
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset {path!r}: no such file or directory")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # JSON Lines (whatever the extension)
        data = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: neither a JSON document nor JSON Lines ({e.msg})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON array of objects or one object per line")
    return data


def _text(value, where):
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _split_chat(messages, where):
    if not isinstance(messages, list) or len(messages) < 2 or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"{where}: a chat needs at least one prompt message and a final assistant message")
    last = messages[-1]
    if last.get("role", last.get("from")) not in ("assistant", "gpt"):
        raise ValueError(f"{where}: the last message must be the assistant's response, got role "
                         f"{last.get('role', last.get('from'))!r}")
    prompt = [{"role": {"human": "user", "gpt": "assistant"}.get(m.get("role", m.get("from")), m.get("role", m.get("from"))),
               "content": _text(m.get("content", m.get("value")), where)} for m in messages[:-1]]
    return prompt, _text(last.get("content", last.get("value")), where)


def _response(value, prompt, where):
    """(prompt, response text) from a response field: a string, a whole chat, or TRL's [assistant]."""
    if not isinstance(value, list):
        if prompt is None:
            raise ValueError(f"{where}: a response without a prompt")
        return (prompt if isinstance(prompt, list) else _text(prompt, where)), _text(value, where)
    if len(value) == 1 and prompt is not None:  # TRL's conversational preference rows
        return _response(value[0].get("content", value[0].get("value")), prompt, where)
    return _split_chat(value, where)


def prompt_response(record: dict, index: int = 0):
    """(prompt: str or chat messages, response: str, rejected: str or None) of one row, in any of the
    formats above."""
    where = f"row {index}"
    chat = record.get("messages", record.get("conversations"))
    rejected = None
    # A preference row is read as one even when it also carries the chosen chat as `messages`
    # (UltraFeedback-binarized): its `rejected` half budgets the official truncation.
    if chat is not None and record.get("chosen") is None:
        prompt, response = _split_chat(chat, where)
    else:
        response_key = next((k for k in RESPONSE_KEYS if record.get(k) is not None), None)
        prompt = record.get("prompt", record.get("instruction"))
        if response_key is None or (prompt is None and not isinstance(record[response_key], list)):
            raise ValueError(f"{where} has keys {sorted(record)}; expected one of the formats {', '.join(FORMATS)}")
        prompt, response = _response(record[response_key], prompt, f"{where} '{response_key}'")
        if record.get("input") and isinstance(prompt, str):
            prompt = prompt + "\n" + _text(record["input"], where)
        if response_key == "chosen" and record.get("rejected") is not None:
            rejected = _response(record["rejected"], prompt, f"{where} 'rejected'")[1]
    if record.get("system"):
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        prompt = [{"role": "system", "content": _text(record["system"], where)}] + prompt
    return prompt, response, rejected
