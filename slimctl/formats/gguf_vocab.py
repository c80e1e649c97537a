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
        writer.add_token_scores(merge_scores(model, [t.decode("utf-8") for t in tokens], scores))
        writer.add_token_types(_added_types(tokenizer, list(types)))
        writer.add_add_space_prefix(_adds_space_prefix(tokenizer))  # Llama 2 does, Gemma does not
        info = {"model": "llama", "pre": "default", "n_vocab": len(tokens)}
    else:
        pre = pre_tokenizer_name(tok_json)
        tokens, types = _bpe_tokens(tokenizer)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        info = {"model": "gpt2", "pre": pre, "n_vocab": len(tokens)}
    special = gguf.SpecialVocab(folder, load_merges=info["model"] == "gpt2", n_vocab=info["n_vocab"])
    special.add_special_token.update(_adds_special(tokenizer))
    special.add_to_gguf(writer, quiet=True)
    return info


def merge_scores(model: dict[str, Any], tokens: list[str], default: tuple[float, ...]) -> list[float]:
    """SentencePiece scores from BPE merge ranks. llama.cpp's SPM tokenizer merges the adjacent pair whose
    result has the highest score; the BPE tokenizer applies the lowest-ranked merge. Scoring each token
    -(rank of the first merge that makes it) gives llama.cpp the same order (gguf's LlamaHfVocab writes
    -1000 for every token, under which llama.cpp merges left to right and splits words differently)."""
    made: dict[str, int] = {}
    for rank, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        made.setdefault(a + b, rank)
    return [-float(made[t]) if t in made else float(d) for t, d in zip(tokens, default)]


def _added_types(tokenizer, types: list[int]) -> list[int]:
    """Added tokens inside the base vocabulary (Gemma's '<b>', '<unused0>'…) as llama.cpp must see them:
    special ones CONTROL, the rest USER_DEFINED, which llama.cpp matches in raw text as the HF tokenizer does."""
    import gguf

    for i, added in tokenizer.added_tokens_decoder.items():
        if i < len(types) and types[i] != gguf.TokenType.BYTE:
            types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    return types


def _adds_space_prefix(tokenizer) -> bool:
    """Whether the SentencePiece-style tokenizer starts text with '▁' (llama.cpp's add_space_prefix)."""
    first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"][:1])
    return bool(first) and first[0].startswith("\u2581")


def _adds_special(tokenizer) -> dict[str, bool]:
    """Whether the tokenizer puts BOS first / EOS last on every input, as it behaves (not as configured)."""
    ids = tokenizer("a")["input_ids"]
    out = {}
    if tokenizer.bos_token_id is not None:
        out["bos"] = ids[:1] == [tokenizer.bos_token_id]
    if tokenizer.eos_token_id is not None:
        out["eos"] = ids[-1:] == [tokenizer.eos_token_id]
    return out
