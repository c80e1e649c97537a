"""Per-layer FFN widths (non-uniform structured pruning): transformers configs state one intermediate
width, so the config keeps the largest and `slimctl_layer_sizes` lists every layer's; slimctl's loaders
shrink a freshly built skeleton to those widths before reading the weights. Plain `from_pretrained`
refuses such a folder (its weights do not have the config's shapes) rather than loading it wrongly."""
from __future__ import annotations

from typing import Any

KEY = "slimctl_layer_sizes"


def set_layer_sizes(config, size_key: str, widths: list[int] | None) -> None:
    """List every layer's width under `size_key`; None: the widths are uniform again (the key goes)."""
    if widths is not None:
        setattr(config, KEY, {size_key: list(widths)})
    elif hasattr(config, KEY):
        delattr(config, KEY)


def drop_layers(config, drop: list[int]) -> None:
    """The per-layer widths of the layers that stay, after depth pruning removed `drop`."""
    sizes = getattr(config, KEY, None)
    if sizes:
        setattr(config, KEY, {k: [w for j, w in enumerate(v) if j not in drop] for k, v in sizes.items()})


def has_layer_sizes(config: Any) -> bool:
    sizes = config.get(KEY) if isinstance(config, dict) else getattr(config, KEY, None)
    return bool(sizes)


def apply_layer_sizes(model) -> None:
    """Shrink each block's FFN of a freshly built model to the widths its config lists (weights are
    left uninitialised: the caller loads them)."""
    from torch import nn

    from .registry import of
    from ..stream.blocks import find_blocks
    from ..errors import ModelLoadError
    from ..stream.skeleton import set_submodule

    sizes = getattr(model.config, KEY, None)
    if not sizes:
        return
    fam = of(model)
    if fam is None or fam.ffn is None or fam.ffn.size_key not in sizes:
        raise ModelLoadError(f"config.json lists {KEY} {list(sizes)} that slimctl cannot apply to this model")
    _, blocks = find_blocks(model)
    widths = sizes[fam.ffn.size_key]
    if len(widths) != len(blocks):
        raise ModelLoadError(f"config.json lists {len(widths)} FFN widths for {len(blocks)} layers")
    for block, w in zip(blocks, widths):
        for name in fam.ffn.producers:
            old = block.get_submodule(name)
            set_submodule(block, name, nn.Linear(old.in_features, w * fam.ffn.parts, bias=old.bias is not None, dtype=old.weight.dtype))
        old = block.get_submodule(fam.ffn.consumer)
        set_submodule(block, fam.ffn.consumer, nn.Linear(w, old.out_features, bias=old.bias is not None, dtype=old.weight.dtype))


def as_slimctl_loads(model) -> None:
    """A model freshly built from its config (the meta device will do), laid out as slimctl's loader lays out the
    artifact: Conv1D as Linear and one Linear per expert (families/convert.py), then the per-layer FFN widths.
    Steps that change the config compare shapes against it before they call the result reloadable."""
    from .convert import prepare

    prepare(model, meta=True)
    apply_layer_sizes(model)
