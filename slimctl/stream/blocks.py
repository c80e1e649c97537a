"""Where a model's repeated blocks are, and how to capture a block's inputs: what calibration, streaming and the
techniques share."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedError


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the ModuleList holding the most parameters."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise UnsupportedError("found no repeated blocks (an nn.ModuleList of layers) to calibrate block by block")
    return best


class _Stop(Exception):
    pass


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[dict], got=None) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of `block` for every calibration batch, captured by stopping the forward there
    (appended to `got`: a list, or Activations kept on disk)."""
    got = [] if got is None else got

    def hook(mod, args, kwargs):
        got.append((args, dict(kwargs)))
        raise _Stop

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for b in batches:
                try:
                    model(**b, use_cache=False) if "use_cache" in _forward_params(model) else model(**b)
                except _Stop:
                    pass
    finally:
        h.remove()
    return got


def _forward_params(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def forward_all(model: nn.Module, batches: list[dict]) -> None:
    """One forward pass over the calibration batches (for hooks on layers outside the blocks)."""
    use_cache = "use_cache" in _forward_params(model)
    with torch.inference_mode():
        for b in batches:
            model(**b, use_cache=False) if use_cache else model(**b)


def map_tensors(obj, fn):
    """obj with fn applied to every tensor inside it (tuples, lists and dicts rebuilt, anything else kept): a block's
    captured (args, kwargs) copied, moved to a device, …"""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
