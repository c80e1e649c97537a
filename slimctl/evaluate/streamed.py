"""Forward passes and perplexity of streamed models (stream.py): the inputs of every window go
through one block at a time (each block read once per pass), then the modules after the blocks
(final norm, LM head) turn the last hidden states into logits. Baseline and slimmed run as two
streamed models side by side, so agreement and KL are measured exactly as in memory, with no
whole model in memory. The baseline's last hidden states are cached (keyed by its files, the data
and the settings): a second run over the same model only streams the slimmed one."""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..stream.blocks import capture_block_inputs, find_blocks, with_hidden
from ..errors import UnsupportedError
from ..kinds import CAUSAL_LM


class _Emit(nn.Module):
    """Stands in for the blocks in the tail pass: returns the recorded last hidden state."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool, like: nn.Module | None = None):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple
        # plain attributes the model's loop reads off each block (ModernBERT, Gemma: `attention_type`)
        for k, v in (vars(like) if like is not None else {}).items():
            if not k.startswith("_") and k not in ("training", "hidden", "as_tuple") and isinstance(v, (str, int, float, bool)):
                setattr(self, k, v)

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


def last_hidden(model: nn.Module, batches: list[dict], track=lambda it, desc, total: it,
                desc: str = "streamed forward") -> tuple[list[torch.Tensor], bool]:
    """The last block's output for each batch, one block in memory at a time; also whether the
    blocks return tuples (the tail pass must return the same)."""
    from ..stream.skeleton import stream_of

    st = stream_of(model)
    prefix, blocks = find_blocks(model)
    with torch.inference_mode():
        with st.outside_on_demand():
            inputs = capture_block_inputs(model, blocks[0], batches)
        as_tuple = False
        for i in track(range(len(blocks)), desc, len(blocks)):
            nxt = []
            with st.held(f"{prefix}.{i}") as block:
                for a, k in inputs:
                    out = block(*a, **k)
                    as_tuple = isinstance(out, (tuple, list))
                    nxt.append(with_hidden(a, k, out[0] if as_tuple else out))
            inputs = nxt
    return [a[0] if a else k["hidden_states"] for a, k in inputs], as_tuple


@contextlib.contextmanager
def tail(model: nn.Module, grad: bool = False):
    """Within it, logits(hidden, as_tuple) runs the modules after the blocks on recorded hidden states
    (the blocks swapped for _Emit, zero input embeddings so the embedding table is not read). A streamed
    model's modules are read from disk for each call (the page cache makes that cheap beside the blocks),
    or, with `grad` (gradients flow back to `hidden`), once for the whole context, so that a backward pass
    after the call still finds them. Works on a model in memory too."""
    from ..stream.skeleton import stream_of

    st = stream_of(model)
    prefix, blocks = find_blocks(model)
    parent = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
    attr = prefix.rpartition(".")[2]
    original = getattr(parent, attr)
    width = model.config.hidden_size

    def logits(hidden: torch.Tensor, as_tuple: bool) -> torch.Tensor:
        setattr(parent, attr, nn.ModuleList([_Emit(hidden, as_tuple, original[-1])]))
        try:  # the tail's modules are read for this call only: two models' LM heads are never held together
            embeds = torch.zeros(hidden.shape[0], hidden.shape[1], width, dtype=hidden.dtype)
            with st.outside_on_demand() if st and not grad else contextlib.nullcontext():
                out = model(inputs_embeds=embeds, use_cache=False)
            return out.logits if hasattr(out, "logits") else out.last_hidden_state  # an encoder: its states
        finally:
            setattr(parent, attr, original)

    with torch.enable_grad() if grad else torch.inference_mode():
        with st.outside_on_demand() if st and grad else contextlib.nullcontext():
            yield logits


def forward_logits(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """Logits of a streamed model for each batch (the reload check; small inputs only)."""
    hidden, as_tuple = last_hidden(model, batches)
    with tail(model) as logits:
        return [logits(h, as_tuple) for h in hidden]


def baseline_key(folder: Path, settings: dict[str, Any], data: str | None) -> str:
    """What the cached baseline hidden states depend on: the weight files (names, sizes, times),
    the config, the eval settings and the data file."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).glob("*.safetensors")) + [Path(folder) / "config.json"]:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update((Path(folder) / "config.json").read_bytes())
    if data:
        st = Path(data).stat()
        h.update(f"{Path(data).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def evaluate_streamed(model: nn.Module, reference: nn.Module, ref_folder: Path, tokenizer, kind: str, spec,
                      seed: int = 0, track=lambda it, desc, total: it, say=lambda m: None):
    """Perplexity of a streamed slimmed model beside its streamed reference (causal LMs)."""
    from .evaluation import bos_prefix, perplexity_windows, score_windows, settings_for, window_input
    from ..models import cache_dir

    if kind != CAUSAL_LM:
        raise UnsupportedError(f"--stream evaluates causal LMs (perplexity); this is a {kind} model: "
                               "slim it without --stream, or pass --skip-eval")
    if spec.tasks:
        raise UnsupportedError("lm-eval tasks need the whole model in memory; run them without --stream")
    torch.manual_seed(seed)
    s = settings_for(kind, spec)
    t0 = time.perf_counter()
    texts, ids, held, wins = perplexity_windows(tokenizer, s, spec.data)
    pre = bos_prefix(tokenizer)
    if pre:
        s = {**s, "bos_each_window": True}
    batches = [{"input_ids": window_input(ids, b, e, pre)} for b, e, _ in wins]
    cache = cache_dir() / "streamed-baseline" / f"{baseline_key(ref_folder, s, spec.data)}.pt"
    cached = _read_cache(cache)
    if cached is None:
        ref_hidden, ref_tuple = last_hidden(reference, batches, track, "baseline, streamed")
        _write_cache(cache, ref_hidden, ref_tuple)
    else:
        say(f"baseline last hidden states from the cache ({cache})")
        ref_hidden, ref_tuple = cached
    hidden, as_tuple = last_hidden(model, batches, track, "slimmed, streamed")
    with tail(model) as logits, tail(reference) as ref_logits:
        pairs = ((logits(h, as_tuple)[0, len(pre):], ref_logits(r, ref_tuple)[0, len(pre):])
                 for h, r in zip(hidden, ref_hidden))
        ev = score_windows(s, spec.data, texts, ids, held, wins, pairs, track)
    ev.seconds = time.perf_counter() - t0
    ev.extra["streamed"] = {"baseline_cached": cached is not None, "cache": str(cache)}
    return ev


def _read_cache(path: Path):
    if not path.exists():
        return None
    try:
        got = torch.load(path, weights_only=True)
        return list(got["hidden"]), bool(got["as_tuple"])
    except Exception:  # a damaged cache entry is recomputed, not trusted
        return None


def _write_cache(path: Path, hidden: list[torch.Tensor], as_tuple: bool) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
    os.close(fd)
    torch.save({"hidden": hidden, "as_tuple": as_tuple}, tmp)
    os.replace(tmp, path)
