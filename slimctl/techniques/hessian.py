"""Input statistics of Linear layers and the factorisations taken from them: the Hessian proxy H = 2/n Σ x xᵀ
(GPTQ, SparseGPT), per-feature norms, maxima and sums (Wanda, SmoothQuant, structured pruning), gathered by forward
hooks with inputs shared between readers counted once; the upper Cholesky factor of (H + λI)⁻¹ with dampening
raised until it exists; the relative output error from H."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from ..results import stages

# From this width on, scipy's BLAS/LAPACK routines (half the flops of torch's way) are used. Their OpenBLAS threads
# keep spinning beside torch's OpenMP threads after each call, which costs tens of milliseconds per call on a
# 2-core CPU: below this width that costs more than the flops saved (GPTQ on smollm2-135m, widths 576/1536: 2.3x
# slower with them), above it the n³ work dominates (a 70B layer's 28,672-wide Hessian: minutes).
SCIPY_MIN_WIDTH = 4096


def _syrk(x: torch.Tensor):
    """BLAS's symmetric rank-k update (scipy) for wide float32 CPU inputs: XᵀX in half a GEMM's flops; or None."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] < SCIPY_MIN_WIDTH:
        return None
    try:
        from scipy.linalg.blas import ssyrk
    except ImportError:
        return None
    return ssyrk


LOWER_BLOCKS = 8  # row blocks of XᵀX's lower triangle: 9/16 of the GEMM's flops (576 wide: 5.6 -> 3.6 ms per 2,048 tokens)


def _lower_blocks(d: int) -> range:
    return range(0, d, max(64, -(-d // LOWER_BLOCKS)))


def lower_flops_share(d: int) -> float:
    """The share of a full XᵀX GEMM's flops that `add_lower` does for width d."""
    b = _lower_blocks(d).step
    return sum(min(i + b, d) * (min(i + b, d) - i) for i in _lower_blocks(d)) / (d * d)


def add_lower(h: torch.Tensor, x: torch.Tensor) -> None:
    """h += xᵀx on h's lower triangle and diagonal only (a GEMM per block of rows, each up to the diagonal); the
    upper triangle is left stale until `_mirror_lower`. The same sums as the full GEMM up to float rounding."""
    d = x.shape[1]
    blocks = _lower_blocks(d)
    for i in blocks:
        j = min(i + blocks.step, d)
        h[i:j, :j].addmm_(x[:, i:j].T, x[:, :j])


def _mirror_lower(h: torch.Tensor, block: int = 1024) -> None:
    """Copy h's lower triangle onto its upper one, in place, a block of rows at a time (no n x n temporary)."""
    n = h.shape[0]
    with torch.inference_mode(h.is_inference()):  # made inside the calibration pass's inference mode, or not
        for i in range(0, n, block):
            j = min(i + block, n)
            h[:i, i:j] = h[i:j, :i].T
            d = h[i:j, i:j]
            d.copy_(d.tril() + d.tril(-1).T)


class InputStats:
    """Forward hooks on Linear layers that accumulate what calibration needs from their inputs:
    the Hessian proxy H = 2/n Σ x xᵀ (GPTQ, SparseGPT), the squared L2 norm per input feature
    (Wanda), the max |x| per input feature (SmoothQuant) and the sum per input feature (structured
    pruning's bias compensation).

    Layers that read the very same input tensor (q/k/v after one norm, gate/up, Phi-2's parallel
    readers) are counted once (`share`): the first hook to see an input tensor accumulates it, the
    others follow it and get the same statistics (the same tensors) at `finish`. A layer that follows
    another on one call but not on another sets `broken`, and `collect` counts again without sharing."""

    def __init__(self, layers: dict[str, nn.Linear], hessian: bool = False, share: bool = True):
        self.n: dict[str, int] = {k: 0 for k in layers}
        self._widths = {k: l.in_features for k, l in layers.items()}
        self.hessian: dict[str, torch.Tensor] = {}  # made at a layer's first counted input (followers hold none)
        self._want_hessian = hessian
        self.sq_norm = {k: torch.zeros(l.in_features) for k, l in layers.items()}
        self.absmax = {k: torch.zeros(l.in_features) for k, l in layers.items()}
        self.sum = {k: torch.zeros(l.in_features, dtype=torch.float64) for k, l in layers.items()}
        # tr(W H Wᵀ) = 2/n Σ ‖W x‖² per layer (its own output, bias taken off), for GPTQ's relative output error
        self.out_energy = {k: 0.0 for k in layers} if hessian else {}
        self._out_n = {k: 0 for k in layers}
        self.share, self.broken = share, False
        self.leader: dict[str, str] = {}  # layer -> the layer whose statistics it shares (itself when none)
        self._calls = {k: 0 for k in layers}
        self._last: tuple | None = None  # (weak reference to the latest input tensor, the layer that counted it)
        self._hooks = [l.register_forward_hook(self._hook(k)) for k, l in layers.items()]

    def _lead(self, name: str, x: torch.Tensor) -> str:
        """The layer that counts this call's input: an earlier hook that saw this very tensor, or `name`."""
        import weakref

        self._calls[name] += 1
        if not self.share:
            return name
        lead = self._last[1] if self._last is not None and self._last[0]() is x else name
        if lead == name:
            self._last = (weakref.ref(x), name)
        if self.leader.setdefault(name, lead) != lead:
            self.broken = True
        return lead

    def _energy(self, name: str, mod, out: torch.Tensor) -> None:
        y = out.detach().reshape(-1, out.shape[-1]).float()
        if getattr(mod, "bias", None) is not None:
            y = y - mod.bias.detach().float()
        n, m = self._out_n[name], y.shape[0]
        with stages.stage(stages.STATISTICS, 3.0 * y.numel()):
            self.out_energy[name] = (self.out_energy[name] * n + 2.0 * float((y * y).sum())) / (n + m)
        self._out_n[name] = n + m

    def _hook(self, name: str):
        def fn(mod, args, out):
            if self._want_hessian and isinstance(out, torch.Tensor):
                self._energy(name, mod, out)
            if self._lead(name, args[0]) != name or self.broken:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            m, d = x.shape
            syrk = _syrk(x) if self._want_hessian else None
            flops = (0.5 if syrk else lower_flops_share(d)) * 2.0 * m * d * d if self._want_hessian else 4.0 * m * d
            with stages.stage(stages.STATISTICS, flops):
                self.sq_norm[name] += (x * x).sum(0)
                self.sum[name] += x.sum(0, dtype=torch.float64)
                self.absmax[name] = torch.maximum(self.absmax[name], x.abs().amax(0))
                if self._want_hessian:
                    n = self.n[name]
                    h = self.hessian.setdefault(name, torch.zeros(d, d))
                    if syrk is not None:  # H ← n/(n+m) H + 2/(n+m) XᵀX, its lower triangle only (finish mirrors it)
                        syrk(2.0 / (n + m), x.contiguous().numpy().T, beta=n / (n + m), c=h.numpy().T, trans=0,
                             lower=0, overwrite_c=1)
                    else:  # torch's GEMMs, lower triangle by blocks of rows (see SCIPY_MIN_WIDTH)
                        h.mul_(n / (n + m))
                        add_lower(h, x * (2.0 / (n + m)) ** 0.5)
            self.n[name] += m
        return fn

    def finish(self) -> "InputStats":
        """Remove the hooks; each Hessian, accumulated on its lower triangle, gets its upper one; each follower gets
        its leader's statistics (the same tensors)."""
        self.remove()
        for h in self.hessian.values():  # leaders' only: followers get theirs below
            _mirror_lower(h)
        if self._want_hessian:  # a zero Hessian for a layer no input reached
            for name, width in self._widths.items():
                if self.leader.get(name, name) == name:
                    self.hessian.setdefault(name, torch.zeros(width, width))
        for name, lead in self.leader.items():
            if lead == name:
                continue
            if self._calls[name] != self._calls[lead] or self.leader.get(lead, lead) != lead:
                self.broken = True
                return self
            self.n[name] = self.n[lead]
            for acc in (self.hessian, self.sq_norm, self.absmax, self.sum):
                if lead in acc:
                    acc[name] = acc[lead]
        return self

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def collect(layers: dict[str, nn.Linear], run: Callable[[], None], hessian: bool = False) -> InputStats:
    """Input statistics of `layers` over what `run()` feeds them, inputs shared between layers counted once
    (counted again without sharing in the rare case the sharing was not the same on every call)."""
    stats = InputStats(layers, hessian=hessian)
    try:
        run()
    finally:
        stats.finish()
    if not stats.broken:
        return stats
    stats = InputStats(layers, hessian=hessian, share=False)
    try:
        run()
    finally:
        stats.finish()
    return stats


def hessian_start(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float copies of W and H where input features never seen in calibration (H_jj = 0) are
    neutralised: their weights zeroed, their diagonal set to 1 (as in GPTQ and SparseGPT)."""
    w = w.detach().float().clone()
    dead = torch.diag(h) == 0
    if bool(dead.any()):  # copy H only when it changes (it is the largest matrix a layer needs)
        h = h.clone()
        h[dead, dead] = 1
        w[:, dead] = 0
    return w, h


def relative_output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """‖(W − Ŵ) X‖² / ‖W X‖² over the calibration inputs, via H ∝ X Xᵀ."""
    out_f, in_f = w.shape
    with stages.stage(stages.ERROR, 2 * 2.0 * out_f * in_f * in_f):  # trace(A H Aᵀ) = Σ (A H) ∘ A
        d = w - w_hat
        return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp(min=1e-12))


MAX_DAMPENING = 1.0


def inverse_hessian_factor(h: torch.Tensor, dampening: float, layer: str = "a layer",
                           used: dict[str, float] | None = None) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = dampening × mean(diag H).

    A Hessian that is not positive definite at this dampening is retried with the dampening doubled
    (as GPTQ's reference implementations raise damp_percent) up to MAX_DAMPENING; the dampening that
    worked goes into `used[layer]`. A non-finite Hessian (NaN/Inf calibration activations) or one that
    no dampening fixes is a DataError naming the layer."""
    from ..errors import DataError

    if not torch.isfinite(h).all():
        raise DataError(f"the calibration inputs of {layer} hold NaN or Inf (its Hessian is not finite): the model "
                        "produces non-finite activations on the calibration text; check the checkpoint")
    damp = dampening
    with stages.stage(stages.FACTOR, (2.0 if _trtri(h) else 4.0) * h.shape[0] ** 3 / 3):
        return _factor(h, damp, layer, used)


def _trtri(h: torch.Tensor):
    """LAPACK's in-place triangular inverse (scipy) for a wide float CPU matrix like h, or None (narrower than
    SCIPY_MIN_WIDTH, scipy missing, other dtype)."""
    if h.dtype not in (torch.float32, torch.float64) or h.device.type != "cpu" or h.shape[0] < SCIPY_MIN_WIDTH:
        return None
    return _lapack_trtri(h.dtype)


@functools.lru_cache(maxsize=None)
def _lapack_trtri(dtype: torch.dtype):
    """Looked up once per dtype (inverse_hessian_factor asks twice per layer: for the flop count, then to run it)."""
    try:
        from scipy.linalg import get_lapack_funcs
    except ImportError:
        return None
    return get_lapack_funcs(("trtri",), (torch.zeros(1, 1, dtype=dtype).numpy(),))[0]


def upper_inverse_factor(h: torch.Tensor, lam: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, (H + λI)⁻¹ = UᵀU, from one Cholesky and one triangular inverse.

    With J the reversal of rows and columns, J(H + λI)J = L Lᵀ gives (H + λI)⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J), so
    U = J L⁻¹ J (upper): 2n³/3 flops, against 4n³/3 for Cholesky, inverse from it and Cholesky again (the
    path below SCIPY_MIN_WIDTH, or where scipy's LAPACK is missing or H is not a float CPU tensor); equal within
    float rounding."""
    trtri = _trtri(h)
    if trtri is None:
        hd = h.clone()  # H + λI, one copy of H at a time (no identity matrix beside it)
        hd.diagonal().add_(lam)
        lower = torch.linalg.cholesky(hd)
        del hd
        inverse = torch.cholesky_inverse(lower)
        del lower
        return torch.linalg.cholesky(inverse, upper=True)
    hd = h.flip(0, 1)  # a copy: J H J, whose diagonal gets the same λ
    hd.diagonal().add_(lam)
    lower = torch.linalg.cholesky(hd)
    del hd
    # LAPACK inverts a Fortran-ordered matrix in place (no copy): torch's Cholesky is Fortran-ordered L; were it
    # C-ordered, its transpose would be Lᵀ in Fortran order, whose inverse is (L⁻¹)ᵀ
    a = lower.numpy()
    fortran = a.flags.f_contiguous
    inv, info = trtri(a if fortran else a.T, lower=1 if fortran else 0, overwrite_c=1)
    if info != 0:
        raise torch.linalg.LinAlgError(f"triangular inverse failed (LAPACK info {info})")
    inv = torch.from_numpy(inv)
    del lower, a
    return (inv if fortran else inv.T).flip(0, 1)


def _factor(h: torch.Tensor, damp: float, layer: str, used: dict[str, float] | None) -> torch.Tensor:
    from ..errors import DataError

    while True:
        try:
            factor = upper_inverse_factor(h, damp * float(torch.mean(torch.diag(h))))
            if used is not None:
                used[layer] = damp
            return factor
        except torch.linalg.LinAlgError:
            if damp >= MAX_DAMPENING:
                raise DataError(f"the Hessian of {layer} is not positive definite even with dampening {damp:g}: its "
                                "calibration inputs are degenerate (too few or constant); give more calibration text") from None
            damp = min(damp * 2, MAX_DAMPENING)
