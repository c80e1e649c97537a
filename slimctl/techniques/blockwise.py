"""Backward passes of a causal LM one block at a time (checkpointing at block boundaries), for a model in
memory or streamed: a forward pass keeps each block's inputs, the modules after the blocks turn the last
block's output into logits and `seeds` gives the gradients wanted at the logits, then each block, from the
last to the first, runs again with gradients and passes the gradient at its output back to its input.
Tensor hooks on activations inside a block (Fisher's scores on each Linear's output) see the gradients a
whole-model backward pass would give them. A streamed model holds one block at a time (read, used,
released unchanged); a model in memory runs the same code, so both give the same numbers bit for bit, and
autograd never holds more than one block's graph. With a calibration device (placement.py) each block runs
there in its turn; the modules after the blocks (final norm, LM head) stay on the CPU."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from . import placement
from ..results import stages
from ..stream.blocks import capture_block_inputs, find_blocks, map_tensors, with_hidden

Seeds = Callable[[int, torch.Tensor], Iterator[torch.Tensor]]  # (batch index, its float32 logits) -> gradients at them
OnOutput = Callable[[int, int, torch.Tensor], None]  # (block index, batch index, a gradient at the block's output)


def backward_by_block(model: nn.Module, parts: list[dict], seeds: Seeds, stage: str = stages.SENSITIVITY,
                      track=lambda it, desc, total: it, on_output: OnOutput | None = None,
                      desc: str = "gradients") -> None:
    """For each batch in `parts`, one backward pass per gradient `seeds(index, logits)` yields, through every
    block (parameters frozen: gradients reach activations only; their flags are restored afterwards);
    `on_output` sees each gradient as it arrives at a block's output."""
    from ..stream.skeleton import stream_of

    st = stream_of(model)
    prefix, blocks = find_blocks(model)
    saved: list = []
    with _frozen(model):
        try:
            hidden, as_tuple = _forward(model, st, prefix, blocks, parts, saved, stage, track, desc)
            grads = placement.to_device(_head(model, hidden, as_tuple, seeds, stage), placement.current())
            del hidden
            for i in track(list(reversed(range(len(blocks)))), f"{desc}: backward", len(blocks)):
                for p, gs in enumerate(grads) if on_output else ():
                    for g in gs:
                        on_output(i, p, g)
                with _held(st, f"{prefix}.{i}", blocks[i]) as block, placement.block_on_device(block):
                    grads = [_through(block, item, g, stage) for item, g in zip(saved[i], grads)]
                saved.pop().close()  # this block's inputs are no longer needed
        finally:
            for s in saved:
                s.close()


@contextlib.contextmanager
def _held(st, unit: str, block: nn.Module):
    """The block, read for the duration (streamed, unless a step holds it already) and frozen."""
    with st.held(unit) if st is not None else contextlib.nullcontext(block) as mod:
        for p in mod.parameters():
            p.requires_grad_(False)
        yield mod


@contextlib.contextmanager
def _frozen(model: nn.Module):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _forward(model, st, prefix, blocks, parts, saved: list, stage, track, desc):
    """Each block's inputs per batch appended to `saved` (in memory, entries shared between blocks' lists; for a
    streamed model whose activations would not fit, on disk), the last block's outputs, and whether the blocks
    return tuples."""
    from .calibrate import Activations, block_flops

    dev = placement.current()
    with st.outside_on_demand() if st else contextlib.nullcontext():
        inputs = placement.to_device(capture_block_inputs(model, blocks[0], parts), dev)
    on_disk = st is not None and _too_large(model, parts, len(blocks))
    as_tuple = False
    for i in track(range(len(blocks)), f"{desc}: forward", len(blocks)):
        saved.append(Activations(on_disk, device=dev))
        for item in inputs:
            saved[-1].append(item)
        with _held(st, f"{prefix}.{i}", blocks[i]) as block, placement.block_on_device(block), torch.inference_mode():
            nxt = []
            for a, k in inputs:
                with stages.stage(stage, block_flops(block, a[0] if a else k.get("hidden_states"))):
                    out = block(*a, **k)
                as_tuple = isinstance(out, (tuple, list))
                nxt.append(with_hidden(a, k, out[0] if as_tuple else out))
            inputs = nxt
    last = [a[0] if a else k["hidden_states"] for a, k in inputs]  # the modules after the blocks run on the CPU
    return placement.to_device(last, "cpu" if dev is not None else None), as_tuple


def _too_large(model, parts: list[dict], blocks: int) -> bool:
    """Whether every block's inputs together exceed calibrate's share of the memory available."""
    import psutil

    from .calibrate import ACTIVATIONS_SHARE

    tokens = sum(b["input_ids"].numel() for b in parts)
    width = getattr(model.config, "hidden_size", 0) or 0
    return blocks * tokens * width * 4 > ACTIVATIONS_SHARE * psutil.virtual_memory().available


def _head(model, hidden: list[torch.Tensor], as_tuple: bool, seeds: Seeds, stage: str) -> list[list[torch.Tensor]]:
    """Per batch, the gradient at the last block's output of each gradient `seeds` gives at the logits."""
    from ..evaluate.streamed import tail

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    with tail(model, grad=True) as logits_of:
        for p, h in enumerate(hidden):
            leaf = _plain(h).requires_grad_(True)
            tokens = h.numel() // h.shape[-1]
            flops = stages.linear_flops(head, tokens) if head is not None else 0.0
            with stages.stage(stage, flops):
                logits = logits_of(leaf, as_tuple).float()
            got = []
            for g in seeds(p, logits):
                with stages.stage(stage, 2 * flops):
                    got.append(torch.autograd.grad(logits, leaf, g, retain_graph=True)[0])
            out.append(got)
            del logits
    return out


def _through(block: nn.Module, item: tuple, grads: list[torch.Tensor], stage: str) -> list[torch.Tensor]:
    """The block run again with gradients on one batch's input; each gradient at its output taken back
    to its input."""
    from .calibrate import block_flops

    a, k = _plain(item)
    x = a[0] if a else k["hidden_states"]
    x.requires_grad_(True)
    flops = block_flops(block, x)
    with torch.enable_grad():
        with stages.stage(stage, flops):
            out = block(*a, **k)
        h = out[0] if isinstance(out, (tuple, list)) else out
        back = []
        for g in grads:
            with stages.stage(stage, 2 * flops):
                back.append(torch.autograd.grad(h, x, g, retain_graph=True)[0])
    return back


def _plain(obj):
    """A copy of obj whose tensors autograd may use (inputs captured in inference mode cannot be saved for
    backward): each tensor cloned, containers rebuilt, anything else kept."""
    return map_tensors(obj, torch.Tensor.clone)
