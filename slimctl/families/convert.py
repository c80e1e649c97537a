"""Layer layouts slimctl's techniques cannot read, turned into ones they can on load and back on save:
GPT-2's transposed Conv1D into nn.Linear, and transformers 5's fused 3-D experts into one gate/up/down
Linear per expert. Both are exact (the same function, bit for bit up to float summation order)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..stream.skeleton import set_submodule
from .registry import of

PREPARED = "_slimctl_prepared"  # attribute on the model: {module name: "conv1d" | "experts"} prepare() converted


class LinearExperts(nn.ModuleList):
    """Experts as a list of modules with gate_proj/up_proj/down_proj Linears, computing what transformers'
    fused experts compute: for each expert, the tokens routed to it, act(gate) · up -> down, weighted."""

    def __init__(self, fused: nn.Module):
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        n, two_i, hidden = gate_up.shape
        experts = []
        for e in range(n):
            m = nn.Module()
            m.gate_proj = _linear(gate_up[e, : two_i // 2])
            m.up_proj = _linear(gate_up[e, two_i // 2:])
            m.down_proj = _linear(down[e])
            experts.append(m)
        super().__init__(experts)
        self.__dict__["act_fn"] = fused.act_fn  # not a list entry: the list holds experts only
        self.__dict__["_fused_init"] = fused  # not a submodule: filled again and swapped back in on save
        fused.gate_up_proj = nn.Parameter(torch.empty(0))  # the Linears hold the weights now
        fused.down_proj = nn.Parameter(torch.empty(0))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, pos = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            out.index_add_(0, token, (y * top_k_weights[token, pos, None]).to(out.dtype))
        return out

    def fused(self) -> nn.Module:
        """The transformers module again, with the (possibly pruned) expert weights stacked back."""
        mod = self.__dict__["_fused_init"]
        with torch.no_grad():
            mod.gate_up_proj = nn.Parameter(torch.stack([torch.cat([x.gate_proj.weight, x.up_proj.weight]) for x in self]))
            mod.down_proj = nn.Parameter(torch.stack([x.down_proj.weight for x in self]))
        return mod

    def plain(self) -> bool:
        """Whether every expert Linear is still a float nn.Linear (so the fused layout can hold it)."""
        return all(type(m) is nn.Linear for x in self for m in (x.gate_proj, x.up_proj, x.down_proj))


def _linear(w: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return None
    return Conv1D


def prepare(model: nn.Module, meta: bool = False) -> dict[str, str]:
    """Convert the model's Conv1D layers and fused experts in place (once); returns {module name: kind}. Layers on the
    meta device are left for later (a streamed skeleton converts a block when its weights arrive) unless `meta`: then
    they are converted too, for a model built only to compare shapes."""
    fam = of(model)
    if fam is None or getattr(model, PREPARED, None) is not None:
        return getattr(model, PREPARED, None) or {}
    done: dict[str, str] = {}
    conv = _conv1d_type()
    for name, mod in list(model.named_modules()):
        if fam.conv1d and conv is not None and isinstance(mod, conv) and (meta or mod.weight.device.type != "meta"):
            set_submodule(model, name, _linear(mod.weight.detach().T, mod.bias.detach() if mod.bias is not None else None))
            done[name] = "conv1d"
        elif fam.experts and isinstance(getattr(mod, "gate_up_proj", None), nn.Parameter) and mod.gate_up_proj.dim() == 3:
            if mod.gate_up_proj.device.type == "meta" and not meta:
                continue
            set_submodule(model, name, LinearExperts(mod))
            done[name] = "experts"
    setattr(model, PREPARED, done)
    return done


def drop_blocks(model: nn.Module, prefix: str, drop: list[int]) -> None:
    """prepare()'s record of converted layers after the blocks `drop` of the layer list at `prefix` were deleted (depth
    pruning): their layers leave it and later blocks' layers take their new index, so saving finds every one."""
    done = getattr(model, PREPARED, None)
    if not done:
        return
    head, kept = prefix + ".", {}
    for name, kind in done.items():
        if name.startswith(head):
            index, _, rest = name[len(head):].partition(".")
            i = int(index)
            if i in drop:
                continue
            name = f"{head}{i - sum(d < i for d in drop)}.{rest}"
        kept[name] = kind
    setattr(model, PREPARED, kept)


def _conv_back(lin: nn.Linear) -> nn.Module:
    conv = _conv1d_type()(lin.out_features, lin.in_features)
    with torch.no_grad():
        conv.weight = nn.Parameter(lin.weight.detach().T.contiguous())
        conv.bias = nn.Parameter(lin.bias.detach().clone()) if lin.bias is not None else None
    return conv


def _float_layout(mod: nn.Module, kind: str) -> bool:
    """Whether a converted module is still float, so transformers' own layout can hold it."""
    return mod.plain() if kind == "experts" else type(mod) is nn.Linear


def convertible_back(model: nn.Module) -> bool:
    """Whether prepare()'s layers are all still float (so transformers' own layout can hold the model)."""
    done = getattr(model, PREPARED, None) or {}
    return all(_float_layout(model.get_submodule(n), k) for n, k in done.items())


@contextlib.contextmanager
def transformers_layout(model: nn.Module):
    """Within the block, the converted layers are transformers' own again (for save_pretrained)."""
    done = getattr(model, PREPARED, None) or {}
    swapped: list[tuple[str, nn.Module]] = []
    try:
        for name, kind in done.items():
            mod = model.get_submodule(name)
            if not _float_layout(mod, kind):
                continue
            set_submodule(model, name, mod.fused() if kind == "experts" else _conv_back(mod))
            swapped.append((name, mod))
        yield
    finally:
        for name, mod in swapped:
            set_submodule(model, name, mod)
            if isinstance(mod, LinearExperts):  # the stacked copies are not needed once saved
                fused = mod.__dict__["_fused_init"]
                fused.gate_up_proj = nn.Parameter(torch.empty(0))
                fused.down_proj = nn.Parameter(torch.empty(0))
