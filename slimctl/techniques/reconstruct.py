"""Closed-form reconstruction for structured pruning: choose which input-column groups of a Linear to
remove and refit the columns that stay so its output on the calibration inputs changes least
(Optimal Brain Surgeon over column groups, as in ZipLM and SlimGPT), with FLAP-style bias compensation
where the Linear has a bias. Pure linear algebra on H = 2/n Σ x xᵀ, which calibration already collects."""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_UPDATES = 128  # removals are done in at most this many exact joint updates (greedy in chunks)


@dataclass
class Removal:
    kept: torch.Tensor  # indices of the groups kept, ascending
    weight: torch.Tensor  # (out, kept columns): the refit weight, float32
    bias: torch.Tensor | None  # the compensated bias (None when the layer has none)
    error: float  # relative output error ‖(W − Ŵ) X‖² / ‖W X‖² on the calibration inputs
    path: list[tuple[int, float]]  # (groups removed so far, absolute (row-weighted) error ‖(W − Ŵ) X‖² after them), per update


def _augmented(w: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor | None):
    """W and H in float64; with a bias, the constant input 1 becomes one more column that is never
    removed, so the refit moves the removed columns' mean contribution into the bias (FLAP)."""
    w, h = w.detach().double(), h.detach().double()
    if bias is None:
        return w.clone(), h.clone()
    n = h.shape[0]
    ha = torch.empty(n + 1, n + 1, dtype=torch.float64)
    ha[:n, :n] = h
    ha[:n, n] = ha[n, :n] = 2 * mean.double()  # H = 2/n Σ x xᵀ, so the cross terms are 2·mean and 2
    ha[n, n] = 2.0
    return torch.cat([w, bias.detach().double()[:, None]], 1), ha


def _group_costs(w: torch.Tensor, hinv: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Output error of removing each group alone: Σ_rows r_row · w_Sᵀ [H⁻¹]_SS⁻¹ w_S (OBS; r weighs outputs)."""
    if idx.shape[1] == 1:
        j = idx[:, 0]
        return (w[:, j] ** 2 * rows[:, None]).sum(0) / hinv[j, j]
    blocks = torch.linalg.inv(hinv[idx[:, :, None], idx[:, None, :]])
    ws = w[:, idx]  # (out, groups, k)
    return torch.einsum("oak,akl,oal,o->a", ws, blocks, ws, rows)


def remove_groups(w: torch.Tensor, h: torch.Tensor, groups: torch.Tensor, remove: int, dampening: float = 0.01,
                  bias: torch.Tensor | None = None, mean: torch.Tensor | None = None,
                  row_weight: torch.Tensor | None = None, cross: torch.Tensor | None = None,
                  cross_sum: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                  quota: int | None = None) -> Removal:
    """Remove `remove` of the column groups (rows of `groups`: the column indices of each group) of
    w (out × in) greedily by least output error, updating the remaining columns after each choice
    (W ← W − W_S [H⁻¹]_SS⁻¹ [H⁻¹]_S:, and H⁻¹ by the same Schur step); the result equals the
    least-squares refit of the kept columns on the (damped) calibration inputs. `row_weight` weighs each
    output's error in the choice (e.g. the diagonal Fisher of the loss w.r.t. that output: the cost is
    then an estimate of the loss increase); the refit of each row does not depend on it.

    `cross` = 2/n Σ δ xᵀ (out × in) and `cross_sum` = 2/n Σ δ (with a bias) move the refit's target from
    the layer's own output W x to W x + δ, where δ is the drift of the block's output from the unpruned
    model's on the same text: the kept columns then also absorb what upstream pruning changed (the
    unpruned model's output as the target, as in Kwon et al. 2022's mask tuning; `refit`).

    `labels` (one per group) with `quota`: at most `quota` groups of any one label are removed, one group per
    update (e.g. the same number of query heads from every key/value group, which a GQA config needs)."""
    wa, ha = _augmented(w, h, bias, mean)
    n_in = w.shape[1]
    dead = torch.diag(ha) == 0  # never-active inputs: removing them costs nothing
    ha[dead, dead] = 1
    wa[:, dead] = 0
    h0 = ha.clone()  # the output error is measured on the undamped inputs
    ha.diagonal().add_(dampening * torch.mean(torch.diag(ha)))
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(ha))
    w0 = wa.clone()
    alive = torch.ones(len(groups), dtype=torch.bool)
    path, total = [], 0.0
    rows = torch.ones(w.shape[0], dtype=torch.float64) if row_weight is None else row_weight.double()
    updates = remove if labels is not None else min(remove, MAX_UPDATES)
    for chunk in torch.tensor_split(torch.arange(remove), updates) if remove else []:
        live = _candidates(alive, labels, quota)
        cost = _group_costs(wa, hinv, groups[live], rows)
        pick = live[torch.topk(cost, len(chunk), largest=False).indices]
        s = groups[pick].flatten()
        m = torch.linalg.inv(hinv[s][:, s])
        total += float(torch.einsum("os,st,ot,o->", wa[:, s], m, wa[:, s], rows))  # exact for the joint removal (damped H)
        row = m @ hinv[s, :]
        wa -= wa[:, s] @ row
        hinv -= hinv[:, s] @ row
        wa[:, s] = 0
        alive[pick] = False
        path.append((int((~alive).sum()), total))
    kept = alive.nonzero()[:, 0]
    cols = groups[kept].flatten()
    if cross is not None:
        refit(wa, ha, cols, n_in, cross, cross_sum if bias is not None else None)
    d = wa - w0
    err = float(torch.trace(d @ h0 @ d.T) / torch.trace(w0 @ h0 @ w0.T).clamp(min=1e-30))
    return Removal(kept, wa[:, cols].float(), wa[:, n_in].float() if bias is not None else None, err, path)


def _candidates(alive: torch.Tensor, labels: torch.Tensor | None, quota: int | None) -> torch.Tensor:
    """The groups that may go next: alive, and (with labels) of a label that has not lost its quota yet."""
    ok = alive.clone()
    if labels is not None:
        gone = torch.bincount(labels[~alive], minlength=int(labels.max()) + 1)
        ok &= gone[labels] < quota
    return ok.nonzero()[:, 0]


def refit(wa: torch.Tensor, ha: torch.Tensor, cols: torch.Tensor, n_in: int, cross: torch.Tensor,
          cross_sum: torch.Tensor | None) -> None:
    """Add the least-squares fit of the drift δ on the kept inputs to wa in place: wa[:, K] += C_K H_KK⁻¹
    (H damped as for the removal; K = the kept columns, plus the bias column when there is one)."""
    k = torch.cat([cols, torch.tensor([n_in])]) if cross_sum is not None else cols
    c = cross.double()
    if cross_sum is not None:
        c = torch.cat([c, cross_sum.double()[:, None]], 1)
    hk = ha[k][:, k]
    wa[:, k] += torch.cholesky_solve(c[:, k].T.contiguous(), torch.linalg.cholesky(hk)).T
