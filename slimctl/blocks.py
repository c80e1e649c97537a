"""Where a model's repeated blocks are: the one fact calibration, streaming and the techniques share."""
from __future__ import annotations

from torch import nn

from .errors import UnsupportedError


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
