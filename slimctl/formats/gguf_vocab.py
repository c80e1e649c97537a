"""The tokenizer as GGUF metadata: token list, token types, merges, special ids and the name of the
pre-tokenizer llama.cpp should use, read from the model folder's tokenizer.json.

Two tokenizer families are written: byte-level BPE (GPT-2 style: SmolLM, Llama 3, …; GGUF model
"gpt2") and SentencePiece-style BPE with byte fallback (Llama 2, Mistral; GGUF model "llama", through
gguf's LlamaHfVocab). The byte-level pre-tokenizer is named from its structure in tokenizer.json,
so llama.cpp splits text the way the Hugging Face tokenizer does; anything else is refused."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UnsupportedError

GPT2_REGEX_DIGITS = r"\p{N}"  # a Digits(individual_digits) step in front of GPT-2's regex: llama.cpp's "smollm"
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2/2.5/3: digits one by one (llama.cpp's "qwen2")


def pre_tokenizer_name(tok_json: dict[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, read from its structure."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    if kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == QWEN2_SPLIT:
        return "qwen2"
    raise UnsupportedError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp "
                           "name slimctl knows (GPT-2 byte-level, SmolLM digits + byte-level, Llama 3 split, Qwen2 split)")


def _bpe_tokens(tokenizer) -> tuple[list[str], list[int]]:
    """Every id's token and type: control for special added tokens, user-defined for other added ones."""
    import gguf

    vocab = tokenizer.get_vocab()
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    by_id = {i: t for t, i in vocab.items()}
    n = max(len(tokenizer), max(by_id) + 1)
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif by_id[i] in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def add_vocab(writer, folder: str | Path, tokenizer) -> dict[str, Any]:
    """Write the tokenizer into `writer`; returns what was written (model, pre-tokenizer, size)."""
    import gguf

    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists() or not getattr(tokenizer, "is_fast", False):
        raise UnsupportedError(f"GGUF export needs a fast tokenizer with {path.name} in {folder}")
    tok_json = json.loads(path.read_text(encoding="utf-8"))
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')}")
    if model.get("byte_fallback"):  # SentencePiece-style (Llama 2, Mistral)
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        info = {"model": "llama", "pre": "default", "n_vocab": len(tokens)}
    else:
        pre = pre_tokenizer_name(tok_json)
        tokens, types = _bpe_tokens(tokenizer)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        info = {"model": "gpt2", "pre": pre, "n_vocab": len(tokens)}
    gguf.SpecialVocab(folder, load_merges=info["model"] == "gpt2", n_vocab=info["n_vocab"]).add_to_gguf(writer, quiet=True)
    return info
