"""Tied LM heads: whether a module's weight is the input embedding's table, and untying one. One rule for every
step that reads or changes the tie (rotate, slice, lm_head, rtn's embeddings, the list of protected layers)."""
from __future__ import annotations

from torch import nn

from ..families import text_config


def shares_embedding(model, module) -> bool:
    """True when `module.weight` is the input embedding's table: the same Parameter, or the same storage (a
    meta tensor of a streamed skeleton has no storage, so there only the same Parameter counts)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    table, weight = getattr(emb, "weight", None), getattr(module, "weight", None)
    if table is None or weight is None:
        return False
    if weight is table:
        return True
    if "meta" in (table.device.type, weight.device.type):
        return False
    return weight.data_ptr() == table.data_ptr()


def untie(model, name: str) -> None:
    """The module at `name` gets its own copy of the table if it still shares it; every config of the model (a
    multimodal model's text config too) stops tying, and transformers' record of tied keys forgets the module, so
    neither a reload nor a later tie_weights() shares the table again."""
    module = model.get_submodule(name)
    if shares_embedding(model, module):
        w = module.weight
        module.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    for c in {id(model.config): model.config, id(text_config(model.config)): text_config(model.config)}.values():
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    keys = getattr(model, "all_tied_weights_keys", None)
    if isinstance(keys, dict):
        model.all_tied_weights_keys = {k: v for k, v in keys.items() if not k.startswith(name + ".")}


def module_name(model, module) -> str:
    """The dotted name under which `model` holds `module` (the head or embedding to untie or replace)."""
    return next(n for n, m in model.named_modules() if m is module)
