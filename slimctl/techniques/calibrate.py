"""Calibration: seeded sample texts, and running a model one repeated block at a time.

Block-sequential processing (as in GPTQ and SparseGPT): capture the inputs of the first block,
then for each block collect statistics, change the block, and feed the *changed* block's outputs
to the next one. Peak memory stays near one block plus the calibration activations.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Callable

import torch
from torch import nn

from ..results import stages
from . import placement, precision
from .hessian import InputStats, collect
from ..errors import DataError
from ..stream.blocks import capture_block_inputs, find_blocks, forward_all, with_hidden  # noqa: F401  (techniques import them from here)
from ..kinds import CAUSAL_LM

DEFAULT_SEQ_LEN = {CAUSAL_LM: 256}
OTHER_SEQ_LEN = 128


def calibration_batches(tokenizer, kind: str, samples: int, seq_len: int | None, data: str | None,
                        seed: int) -> list[dict[str, torch.Tensor]]:
    """`samples` tokenised texts (batch of one each, no padding), chosen with `seed`."""
    from ..evaluate import data as datasets

    texts = [e.text for e in (datasets.read_file(data) if data else datasets.bbc("calib"))]
    if not texts:
        raise DataError("no calibration text")
    rng = random.Random(seed)
    rng.shuffle(texts)
    length = seq_len or DEFAULT_SEQ_LEN.get(kind, OTHER_SEQ_LEN)
    out = []
    for t in texts[:samples]:
        enc = tokenizer(t, truncation=True, max_length=length, return_tensors="pt")
        if enc["input_ids"].shape[1] >= 2:
            out.append(dict(enc))
    if not out:
        raise DataError("calibration texts are all shorter than 2 tokens")
    return out


def run_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The block's hidden output for one calibration input (timed and counted as a calibration forward)."""
    x = args[0] if args else kwargs.get("hidden_states")
    with stages.stage(stages.FORWARD, block_flops(block, x)), precision.forward():
        out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def block_flops(block: nn.Module, x) -> float:
    """FLOPs of one block forward over hidden states x [batch, tokens, width]: its Linears, plus attention's
    two products (4 x tokens² x width per sequence) when the block has an attention module."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return 0.0
    tokens = x.numel() // x.shape[-1]
    seq = x.shape[-2] if x.dim() >= 3 else 1
    attn = any(n.endswith(("attn", "attention")) for n, _ in block.named_children())
    return stages.linear_flops(block, tokens) + (4.0 * tokens * seq * x.shape[-1] if attn else 0.0)


def sequential(model: nn.Module, batches: list[dict], on_block: Callable[[int, str, nn.Module, list], Any],
               track=lambda it, desc, total: it,
               after_block: Callable[[int, str, nn.Module], None] | None = None,
               batch_tokens: int | None = None, batch_breaks: tuple[int, ...] = ()) -> list[Any]:
    """Call on_block(index, name, block, inputs) for each block in order, then pass the (changed)
    block's outputs on as the next block's inputs, then call after_block(index, name, block) (a change
    the next block's inputs must not see). Returns what on_block returned per block. With `batch_tokens`,
    calibration texts of the same length run together (`stack`): each input then holds several texts."""
    from ..stream.skeleton import stream_of

    if batch_tokens:
        batches = stack(batches, batch_tokens, batch_breaks)

    st = stream_of(model)
    prefix, blocks = find_blocks(model)
    inputs = Activations(on_disk=st is not None and _too_large(model, batches), device=placement.current())
    try:
        with st.outside_on_demand() if st else contextlib.nullcontext():
            capture_block_inputs(model, blocks[0], batches, inputs)
        return _each_block(model, prefix, blocks, st, inputs, on_block, track, after_block)
    finally:
        inputs.close()


BATCH_TOKENS = 2048  # calibration texts stacked per forward: a 256-token matmul runs at about a third of the speed


def stack(batches: list[dict], max_tokens: int, breaks: tuple[int, ...] = ()) -> list[dict]:
    """Runs of consecutive calibration texts of equal length stacked into batches of at most `max_tokens`
    tokens (at least one text each); the order of the texts is kept, and a batch starts at each index in
    `breaks` (so that the first n texts are whole batches). No padding: each text's result is what it would
    be alone, up to float rounding (a matmul over more rows may sum in another order)."""
    out: list[dict] = []
    run: list[dict] = []
    for i, b in enumerate(batches):
        if any(not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[0] != 1 for v in b.values()):
            return batches  # not one text per batch: leave as given
        width = b["input_ids"].shape[1]
        if run and (run[0]["input_ids"].shape[1] != width or (len(run) + 1) * width > max_tokens
                    or run[0].keys() != b.keys() or i in breaks):
            out.append({k: torch.cat([r[k] for r in run]) for k in run[0]})
            run = []
        run.append(b)
    if run:
        out.append({k: torch.cat([r[k] for r in run]) for k in run[0]})
    return out


def texts(item: tuple[tuple, dict]) -> int:
    """How many calibration texts one block input (args, kwargs) holds."""
    a, k = item
    x = a[0] if a else k.get("hidden_states")
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() >= 3 else 1


ACTIVATIONS_SHARE = 0.25  # streamed: calibration activations above this share of available memory go to disk


def _too_large(model: nn.Module, batches: list[dict]) -> bool:
    import psutil

    tokens = sum(b["input_ids"].numel() for b in batches)
    width = getattr(model.config, "hidden_size", 0) or 0
    return tokens * width * 4 > ACTIVATIONS_SHARE * psutil.virtual_memory().available


class Activations:
    """A block's calibration inputs, (args, kwargs) per batch: a list in memory, or, for a streamed model
    whose activations would not fit, one file per batch in a temporary folder (read back on use; exact).
    With a calibration `device` (placement.py) they are held there, or read back to it from the files."""

    def __init__(self, on_disk: bool = False, device: torch.device | None = None):
        import tempfile

        self.items: list = []
        self.device = device
        self.folder = tempfile.mkdtemp(prefix="slimctl-activations-") if on_disk else None

    def _put(self, i: int, value) -> Any:
        if self.folder is None:
            return placement.to_device(value, self.device)
        path = f"{self.folder}/{i}.pt"
        torch.save(placement.to_device(value, "cpu" if self.device is not None else None), path)
        return path

    def append(self, value) -> None:
        self.items.append(self._put(len(self.items), value))

    def __setitem__(self, i: int, value) -> None:
        self.items[i] = self._put(i, value)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        v = self.items[i]
        if self.folder is None:
            return v
        return placement.to_device(torch.load(v, weights_only=False), self.device)  # our own files, this run

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        if self.folder is not None:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)


def _each_block(model, prefix, blocks, st, inputs, on_block, track, after_block) -> list[Any]:
    results = []
    for i in track(range(len(blocks)), "blocks", len(blocks)):
        block = st.load(f"{prefix}.{i}") if st else blocks[i]
        with placement.block_on_device(block):  # on the calibration device for its turn (nothing moves on a CPU)
            results.append(on_block(i, f"{prefix}.{i}", block, inputs))
            from ..quant.layers import dequantized_once

            last = i + 1 == len(blocks)  # no block reads the last one's outputs
            with torch.inference_mode(), dequantized_once(block):  # each input replaced by its output in turn
                for j, (a, k) in enumerate([] if last else inputs):
                    inputs[j] = with_hidden(a, k, run_block(block, a, k))
            if after_block is not None:
                after_block(i, f"{prefix}.{i}", block)
        if st:  # a streamed block is written to the spill folder and its memory freed
            st.release(f"{prefix}.{i}")
    return results


def block_stats(block: nn.Module, inputs: list, layers: dict[str, nn.Linear], hessian: bool = False) -> InputStats:
    """Input statistics of `layers` (inside `block`) over one pass of the block's calibration inputs."""
    def run():
        with torch.inference_mode():
            for a, k in inputs:
                run_block(block, a, k)

    return collect(layers, run, hessian)


def calibrated(model: nn.Module, targets: dict[str, nn.Linear], batches: list[dict],
               slim_layers: Callable[[dict[str, nn.Linear], InputStats], None], hessian: bool = False,
               track=lambda it, desc, total: it, leftover: str = "full-pass",
               unseen: Callable[[dict[str, nn.Linear]], None] | None = None, float_stream=None) -> list[str]:
    """The calibrated driver of Wanda, SparseGPT and GPTQ: block by block, `slim_layers(layers, stats)`
    on the targets inside the block, from their input statistics; the block's outputs (after slimming)
    feed the next block. Targets outside the repeated blocks (an LM head, a pooler) follow `leftover`:
    "full-pass" gathers their statistics in one pass of the whole slimmed model and slims them too;
    "return" leaves them to the caller. Layers that saw no calibration token (an expert the router never
    chose) go to `unseen`, the caller's data-free fallback, when given. With a `float_stream` (gptaq.FloatStream)
    the float model's inputs travel beside the slimmed model's, and `stats.cross` holds GPTAQ's cross terms.
    Returns the targets left over."""
    done: set[str] = set()

    def on_block(i, prefix, block, inputs):
        mine = {n: m for n, m in targets.items() if n.startswith(prefix + ".")}
        if mine:
            stats = block_stats(block, inputs, mine, hessian=hessian)
            if float_stream is not None:
                stats.cross = float_stream.cross(block, inputs, mine)
            blind = {n: m for n, m in mine.items() if stats.n[n] == 0} if unseen else {}
            if blind:
                unseen(blind)
            if len(blind) < len(mine):
                slim_layers({n: m for n, m in mine.items() if n not in blind}, stats)
            done.update(mine)
        elif float_stream is not None:
            float_stream.advance(block)

    sequential(model, batches, on_block, track, batch_tokens=BATCH_TOKENS)
    rest = {n: m for n, m in targets.items() if n not in done}
    if not rest or leftover == "return":
        return list(rest)
    from ..stream.skeleton import refuse, stream_of

    if stream_of(model):
        refuse(f"calibrating layers outside the repeated blocks ({', '.join(list(rest)[:3])})")
    stats = collect(rest, lambda: forward_all(model, batches), hessian)
    slim_layers(rest, stats)
    return []


def unseen_note(method: str, names: list[str], instead: str) -> str:
    """The note for layers that saw no calibration token and what was done with them instead."""
    return (f"{method}: {len(names)} layers saw no calibration token ({', '.join(names[:3])}"
            f"{', …' if len(names) > 3 else ''}; experts the router never chose on this text); {instead}; "
            "more calibration text (calib_samples, calib_seq_len) reaches more of them")


def raised_dampening(used: dict[str, float], asked: float, ctx) -> dict[str, dict[str, float]]:
    """The layers whose Hessian needed more dampening than asked: a note, and the step's record."""
    raised = {k: v for k, v in used.items() if v > asked}
    if raised:
        ctx.notes.append(f"{len(raised)} layers needed dampening above {asked:g} for a positive-definite Hessian "
                         f"(up to {max(raised.values()):g}): {', '.join(list(raised)[:3])}")
    return {"dampening_raised": raised} if raised else {}


def summary(batches: list[dict]) -> dict[str, int]:
    """What a calibrated step records about its data."""
    return {"samples": len(batches), "tokens": sum(b["input_ids"].numel() for b in batches)}
