"""Sparsity masks: per-row and N:M masks from a score, the N:M check, and 2:4 semi-structured
execution on CUDA. The pruning techniques' options and accounting live in techniques/pruning.py."""
from __future__ import annotations

import torch

from ..errors import UnsupportedError


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is pruned: the round(sparsity·in) lowest scores of every output row."""
    k = int(round(sparsity * score.shape[1]))
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: in every run of m consecutive inputs of a row, all but the n
    highest scores."""
    out_f, in_f = score.shape
    s = score.reshape(out_f, in_f // m, m)
    mask = torch.zeros_like(s, dtype=torch.bool)
    mask.scatter_(2, torch.topk(s, m - n, dim=2, largest=False).indices, True)
    return mask.reshape(out_f, in_f)


def is_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """Every run of m consecutive inputs of every row holds at most n non-zeros."""
    out_f, in_f = w.shape
    return bool(((w.reshape(out_f, in_f // m, m) != 0).sum(-1) <= n).all())


def to_semi_structured(model) -> int:
    """Swap the weights of 2:4-sparse Linear layers for torch's semi-structured sparse tensors, so
    they run on sparse tensor cores (CUDA, fp16/bf16). Returns how many layers were converted."""
    from torch import nn

    params = list(model.parameters())
    if not params or params[0].device.type != "cuda":
        raise UnsupportedError("2:4 semi-structured execution needs the model on a CUDA GPU (bench --device cuda)")
    if params[0].dtype not in (torch.float16, torch.bfloat16):
        raise UnsupportedError("2:4 semi-structured kernels take fp16 or bf16 weights; cast the model first (bf16 step)")
    from torch.sparse import to_sparse_semi_structured

    n = 0
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.in_features % 64 == 0 and mod.out_features % 64 == 0 and is_nm(mod.weight, 2, 4):
            mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
            n += 1
    return n
