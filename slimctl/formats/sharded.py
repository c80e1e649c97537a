"""Writes a streamed model (stream.Streamer) as a sharded transformers folder, one unit at a time:
`model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`, with the same tensors the
in-memory save writes (tied copies dropped; weight-only layers in the compressed-tensors layout
where the in-memory artifact uses it) and the same config."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import UnsupportedError

DEFAULT_SHARD_BYTES = 256 * 2**20  # a shard is held in memory until written; keep it small beside a block


def save_streamed(st, folder: Path, shard_bytes: int | None = None, track=lambda it, desc, total: it) -> None:
    """Every unit of the streamed model, in module order, into shards of about `shard_bytes`."""
    shard_bytes = shard_bytes or DEFAULT_SHARD_BYTES
    from safetensors.torch import save_file

    from .base import for_model

    model = st.model
    fmt = for_model(model)
    if fmt.name not in ("compressed-tensors", "slimctl", "transformers"):
        raise UnsupportedError(f"a streamed model cannot be saved as {fmt.name}; run without --stream")
    packed = fmt.name == "compressed-tensors"
    drop = set(st.aliases)  # tied copies (the same Parameter under a second name), as save_pretrained drops them
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    units = st.units()
    tmp_names = []

    def flush():
        if shards[-1]:
            f = folder / f".shard-{len(tmp_names):05d}.safetensors"
            save_file(shards[-1], str(f), metadata={"format": "pt"})
            tmp_names.append((f, list(shards[-1]), sizes[-1]))
            shards[-1] = {}
            sizes[-1] = 0

    for unit in track(units, "writing shards", len(units)):
        with st.held(unit) as mod:
            state = _unit_state(unit, mod, packed)
        for k, v in state.items():
            if k in drop:
                continue
            shards[-1][k] = v
            sizes[-1] += v.numel() * v.element_size()
        if sizes[-1] >= shard_bytes:
            flush()
    flush()
    _name_shards(folder, tmp_names)
    _write_config(model, folder, packed)


def _unit_state(unit: str, mod: torch.nn.Module, packed: bool) -> dict[str, torch.Tensor]:
    from .ctformat import pack_module
    from ..quant.layers import WeightOnlyLinear

    from ..stream.skeleton import _unshare

    # the tensors themselves (no copy): the unit is released, and safetensors only reads them
    state = _unshare({f"{unit}.{k}": v.detach().contiguous() for k, v in mod.state_dict().items()})
    if packed:
        for name, m in mod.named_modules():
            if isinstance(m, WeightOnlyLinear):
                pack_module(state, f"{unit}.{name}" if name else unit, m)
    return state


def _name_shards(folder: Path, tmp: list[tuple[Path, list[str], int]]) -> None:
    n = len(tmp)
    weight_map: dict[str, str] = {}
    total = 0
    for i, (f, keys, size) in enumerate(tmp):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        f.rename(folder / name)
        weight_map.update({k: name for k in keys})
        total += size
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_config(model, folder: Path, packed: bool) -> None:
    from .ctformat import quantization_config

    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)  # as the in-memory save writes it
    if packed:
        path = folder / "config.json"
        cfg: dict[str, Any] = json.loads(path.read_text())
        cfg["quantization_config"] = quantization_config(model)
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(folder)
