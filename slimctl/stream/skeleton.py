"""Streaming: a model whose weights stay on disk. The model is a skeleton on the meta device; a unit
(one repeated block, or one module outside the blocks) is read from the safetensors files when a
step reaches it and goes back to meta when the step moves on, so peak memory is about one block.

A unit a step changed is written to a spill folder (one safetensors file per unit) and read from
there afterwards: later steps, the artifact writer and the checks see the slimmed unit. Calibrated
drivers (calibrate.sequential) and per-layer walks (visit) call load/release; techniques that
cannot work this way are refused by the pipeline (Technique.streams)."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..errors import ModelLoadError, UnsupportedError
from .files import TensorFiles, read_header, read_tensors


def stream_of(model) -> "Streamer | None":
    """The streamer of a streamed skeleton, or None for a model in memory."""
    return getattr(model, "_slimctl_stream", None)


def skeleton(config, kind: str, dtype: torch.dtype) -> nn.Module:
    """The model built from its config with parameters on the meta device and buffers real (the
    model's own code computes rotary frequencies and position ids, as for an in-memory load)."""
    from accelerate import init_empty_weights

    from ..kinds import auto_class

    with init_empty_weights(include_buffers=False):
        model = auto_class(kind).from_config(config, dtype=dtype)
    _tie(model)  # a tied LM head is the embedding's Parameter: stored once, found by identity
    return model.eval()


def _tie(model: nn.Module) -> None:
    """Tie as a loaded model is tied (transformers ties at load time, not on a meta skeleton)."""
    keys = getattr(model, "_tied_weights_keys", None)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not isinstance(keys, dict) or not getattr(text, "tie_word_embeddings", False):
        return
    for target, source in keys.items():
        owner, _, attr = target.rpartition(".")
        try:
            setattr(model.get_submodule(owner), attr, model.get_parameter(source))
        except AttributeError:  # a key pattern this architecture does not have
            continue


class Streamer:
    """Loads and releases the units of one streamed skeleton; keeps what changed in a spill folder."""

    def __init__(self, model: nn.Module, files: TensorFiles):
        from .blocks import find_blocks

        self.model, self.files = model, files
        self.spill: Path | None = None  # made at the first changed unit, removed by close()
        self.block_prefix, blocks = find_blocks(model)
        self.blocks = {f"{self.block_prefix}.{i}": b for i, b in enumerate(blocks)}
        self.spilled: set[str] = set()
        self.loaded: set[str] = set()
        holders = [n for n, m in model.named_modules() if (not n or self.block_prefix.startswith(n + "."))
                   and any(True for _ in m.parameters(recurse=False))]
        if holders:  # a parameter on the root or on a module that holds the blocks belongs to no unit
            raise UnsupportedError(f"{type(model).__name__} keeps parameters directly on {holders[0] or 'the model'}, "
                                   "outside any block or submodule; it cannot be streamed")
        self.outside = {u for u in self.units() if u not in self.blocks}  # units outside the blocks
        self.aliases = _tied_aliases(model)  # a tied tensor's name -> the name it is stored under
        self.peak_unit_bytes = self.peak_block_bytes = 0
        self.params = sum(p.numel() for p in model.parameters())  # before any step swaps Linears out
        self.check_finite = True  # as an in-memory load refuses NaN/Inf weights (--allow-non-finite: False)

    # --- units -------------------------------------------------------------------------------
    def units(self) -> list[str]:
        """Every unit in module order: the blocks, and the outermost modules outside them that own tensors."""
        out: list[str] = []
        for name, mod in self.model.named_modules():
            if name in self.blocks:
                out.append(name)
            elif not name or any(name.startswith(u + ".") for u in out) or name == self.block_prefix \
                    or self.block_prefix.startswith(name + "."):
                continue
            elif _owns_tensors(mod):
                out.append(name)
        return out

    def unit_of(self, name: str) -> str:
        """The unit that holds module `name`."""
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            p = ".".join(parts[:i])
            if p in self.blocks or p in self.outside:
                return p
        return name

    def module(self, unit: str) -> nn.Module:
        return self.model.get_submodule(unit)

    # --- load / release ----------------------------------------------------------------------
    def load(self, unit: str) -> nn.Module:
        """The unit with its tensors read (from the spill folder when a step changed it); never inference
        tensors, even when loaded inside inference mode (a later step may change the module)."""
        with torch.inference_mode(False):
            return self._load(unit)

    def _load(self, unit: str) -> nn.Module:
        mod = self.module(unit)
        if unit in self.loaded:
            return mod
        if unit in self.spilled:
            f = self._spill_file(unit)
            state = read_tensors(f, list(read_header(f)))
        else:
            state = self._from_files(unit, mod)
            if self.check_finite:
                _refuse_non_finite(unit, state)
        missing, unexpected = mod.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if _is_meta(mod, k)]
        if missing or unexpected:
            raise ModelLoadError(f"streaming {unit}: the files do not match the model (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
        self.loaded.add(unit)
        size = sum(t.numel() * t.element_size() for t in state.values())
        self.peak_unit_bytes = max(self.peak_unit_bytes, size)
        if unit in self.blocks:
            self.peak_block_bytes = max(self.peak_block_bytes, size)
        return mod

    def _from_files(self, unit: str, mod: nn.Module) -> dict[str, torch.Tensor]:
        raw = self.files.read(unit)
        state = {k[len(unit) + 1:]: v for k, v in raw.items()}
        for key in mod.state_dict(keep_vars=True):
            full = f"{unit}.{key}"
            if key not in state and full in self.aliases:  # a tied weight stored under the other name
                src = self.aliases[full]
                state[key] = self.files.read(src)[src]
        return state

    @contextlib.contextmanager
    def held(self, unit: str) -> Iterator[nn.Module]:
        """The unit read for the duration of the context, for reading only: released unchanged after it, unless
        it was loaded already (a step holds it), in which case it stays."""
        was = unit in self.loaded
        mod = self.load(unit)
        try:
            yield mod
        finally:
            if not was:
                self.release(unit, changed=False)

    def release(self, unit: str, changed: bool = True) -> None:
        """Back to meta; a changed unit is first written to the spill folder."""
        if unit not in self.loaded:
            return
        mod = self.module(unit)
        if changed:
            from safetensors.torch import save_file

            state = {k: v.detach().contiguous() for k, v in mod.state_dict().items() if v.device.type != "meta"}
            save_file(_unshare(state), str(self._spill_file(unit)))
            self.spilled.add(unit)
        to_meta(mod)
        self.loaded.discard(unit)
        if unit in self.blocks:
            from ..machine import release_freed_memory

            release_freed_memory()  # hand the block's freed pages back to the OS before the next one

    def _spill_file(self, unit: str) -> Path:
        if self.spill is None:
            self.spill = Path(tempfile.mkdtemp(prefix="slimctl-spill-"))
        return self.spill / f"{unit}.safetensors"

    @contextlib.contextmanager
    def outside_on_demand(self) -> Iterator[None]:
        """While open, a module outside the blocks is loaded the first time the forward reaches it;
        on exit every unit loaded this way is released (unchanged)."""
        hooks = []
        mine: set[str] = set()
        for unit in self.outside:
            def pre(mod, args, unit=unit):
                if unit not in self.loaded:
                    self.load(unit)
                    mine.add(unit)
            hooks.append(self.module(unit).register_forward_pre_hook(pre))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            for u in mine:
                self.release(u, changed=False)

    def close(self) -> None:
        if self.spill is not None:
            shutil.rmtree(self.spill, ignore_errors=True)
            self.spill = None


def _all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """torch.isfinite in slices: on a whole table it allocates temporaries of the table's size."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(c).all()) for c in flat.split(chunk))


def _refuse_non_finite(unit: str, state: dict[str, torch.Tensor]) -> None:
    for k, t in state.items():
        if t.is_floating_point() and not _all_finite(t):
            bad = t.numel() - int(torch.isfinite(t).sum())
            raise ModelLoadError(f"{unit}.{k} holds NaN or Inf ({bad:,} of {t.numel():,} values); the checkpoint is "
                                 "broken (or pass --allow-non-finite to load it anyway)")


def _owns_tensors(mod: nn.Module) -> bool:
    return any(True for _ in mod.parameters(recurse=False)) or any(
        n not in mod._non_persistent_buffers_set for n, _ in mod.named_buffers(recurse=False))


def _is_meta(mod: nn.Module, key: str) -> bool:
    """Whether state key `key` of `mod` is still a meta tensor (a real buffer need not come from disk)."""
    t = mod.state_dict(keep_vars=True).get(key)
    return t is not None and t.device.type == "meta"


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """name -> first name, for parameters registered under more than one name (tied embeddings)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; give each its own copy where they do."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def to_meta(mod: nn.Module) -> None:
    """Parameters and persistent buffers back to the meta device (the memory is freed); buffers the
    model computes itself (non-persistent) stay. Never inference tensors, even when released inside
    inference mode (a later step may change the module)."""
    with torch.inference_mode(False):
        _to_meta(mod)


def _to_meta(mod: nn.Module) -> None:
    for sub in mod.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None and name not in sub._non_persistent_buffers_set and b.device.type != "meta":
                sub._buffers[name] = torch.empty_like(b, device="meta")


def visit(model: nn.Module, items: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Walk (name, module) pairs in order; for a streamed skeleton, the unit holding each module is
    loaded before it is yielded and released (and spilled) once the walk leaves it."""
    st = stream_of(model)
    if st is None:
        yield from items
        return
    current = None
    try:
        for name, _ in items:
            unit = st.unit_of(name)
            if unit != current:
                if current is not None:
                    st.release(current)
                st.load(unit)
                current = unit
            yield name, model.get_submodule(name)
    finally:
        if current is not None:
            st.release(current)


def refuse(what: str) -> None:
    """For a step option that needs the whole model in memory at once."""
    raise UnsupportedError(f"{what} needs every weight in memory at once; run without --stream")


def should_stream(setting, folder: Path) -> bool:
    """A recipe's `stream`: True/False as given; "auto" when the weights on disk exceed half the
    memory available now (an in-memory run holds them twice: baseline and slimmed)."""
    if setting != "auto":
        return bool(setting)
    import psutil

    folder = Path(folder)
    if not folder.is_dir():
        return False
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return size > 0.5 * psutil.virtual_memory().available


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of module `name`. In a streamed model the replaced module's tensors go back
    to meta at once: a caller's reference to it (a technique's list of targets) must not keep them."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    setattr(parent, child, new)
    if old is not None and old is not new and stream_of(model) is not None:
        to_meta(old)
