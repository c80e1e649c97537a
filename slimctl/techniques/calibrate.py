"""Calibration: seeded sample texts, and running a model one repeated block at a time.

Block-sequential processing (as in GPTQ and SparseGPT): capture the inputs of the first block,
then for each block collect statistics, change the block, and feed the *changed* block's outputs
to the next one. Peak memory stays near one block plus the calibration activations.
"""
from __future__ import annotations

import contextlib
import functools
import random
from typing import Any, Callable

import torch
from torch import nn

from ..results import stages
from . import precision
from ..errors import DataError
from ..stream.blocks import capture_block_inputs, find_blocks, forward_all, with_hidden  # noqa: F401  (techniques import them from here)
from ..kinds import CAUSAL_LM

DEFAULT_SEQ_LEN = {CAUSAL_LM: 256}
OTHER_SEQ_LEN = 128


def calibration_batches(tokenizer, kind: str, samples: int, seq_len: int | None, data: str | None,
                        seed: int) -> list[dict[str, torch.Tensor]]:
    """`samples` tokenised texts (batch of one each, no padding), chosen with `seed`."""
    from ..evaluate import data as datasets

    texts = [e.text for e in (datasets.read_file(data) if data else datasets.bbc("calib"))]
    if not texts:
        raise DataError("no calibration text")
    rng = random.Random(seed)
    rng.shuffle(texts)
    length = seq_len or DEFAULT_SEQ_LEN.get(kind, OTHER_SEQ_LEN)
    out = []
    for t in texts[:samples]:
        enc = tokenizer(t, truncation=True, max_length=length, return_tensors="pt")
        if enc["input_ids"].shape[1] >= 2:
            out.append(dict(enc))
    if not out:
        raise DataError("calibration texts are all shorter than 2 tokens")
    return out


def run_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The block's hidden output for one calibration input (timed and counted as a calibration forward)."""
    x = args[0] if args else kwargs.get("hidden_states")
    with stages.stage(stages.FORWARD, block_flops(block, x)), precision.forward():
        out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def block_flops(block: nn.Module, x) -> float:
    """FLOPs of one block forward over hidden states x [batch, tokens, width]: its Linears, plus attention's
    two products (4 x tokens² x width per sequence) when the block has an attention module."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return 0.0
    tokens = x.numel() // x.shape[-1]
    seq = x.shape[-2] if x.dim() >= 3 else 1
    attn = any(n.endswith(("attn", "attention")) for n, _ in block.named_children())
    return stages.linear_flops(block, tokens) + (4.0 * tokens * seq * x.shape[-1] if attn else 0.0)


def sequential(model: nn.Module, batches: list[dict], on_block: Callable[[int, str, nn.Module, list], Any],
               track=lambda it, desc, total: it,
               after_block: Callable[[int, str, nn.Module], None] | None = None,
               batch_tokens: int | None = None, batch_breaks: tuple[int, ...] = ()) -> list[Any]:
    """Call on_block(index, name, block, inputs) for each block in order, then pass the (changed)
    block's outputs on as the next block's inputs, then call after_block(index, name, block) (a change
    the next block's inputs must not see). Returns what on_block returned per block. With `batch_tokens`,
    calibration texts of the same length run together (`stack`): each input then holds several texts."""
    from ..stream.skeleton import stream_of

    if batch_tokens:
        batches = stack(batches, batch_tokens, batch_breaks)

    st = stream_of(model)
    prefix, blocks = find_blocks(model)
    inputs = Activations(on_disk=st is not None and _too_large(model, batches))
    try:
        with st.outside_on_demand() if st else contextlib.nullcontext():
            capture_block_inputs(model, blocks[0], batches, inputs)
        return _each_block(model, prefix, blocks, st, inputs, on_block, track, after_block)
    finally:
        inputs.close()


BATCH_TOKENS = 2048  # calibration texts stacked per forward: a 256-token matmul runs at about a third of the speed


def stack(batches: list[dict], max_tokens: int, breaks: tuple[int, ...] = ()) -> list[dict]:
    """Runs of consecutive calibration texts of equal length stacked into batches of at most `max_tokens`
    tokens (at least one text each); the order of the texts is kept, and a batch starts at each index in
    `breaks` (so that the first n texts are whole batches). No padding: each text's result is what it would
    be alone, up to float rounding (a matmul over more rows may sum in another order)."""
    out: list[dict] = []
    run: list[dict] = []
    for i, b in enumerate(batches):
        if any(not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[0] != 1 for v in b.values()):
            return batches  # not one text per batch: leave as given
        width = b["input_ids"].shape[1]
        if run and (run[0]["input_ids"].shape[1] != width or (len(run) + 1) * width > max_tokens
                    or run[0].keys() != b.keys() or i in breaks):
            out.append({k: torch.cat([r[k] for r in run]) for k in run[0]})
            run = []
        run.append(b)
    if run:
        out.append({k: torch.cat([r[k] for r in run]) for k in run[0]})
    return out


def texts(item: tuple[tuple, dict]) -> int:
    """How many calibration texts one block input (args, kwargs) holds."""
    a, k = item
    x = a[0] if a else k.get("hidden_states")
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() >= 3 else 1


ACTIVATIONS_SHARE = 0.25  # streamed: calibration activations above this share of available memory go to disk


def _too_large(model: nn.Module, batches: list[dict]) -> bool:
    import psutil

    tokens = sum(b["input_ids"].numel() for b in batches)
    width = getattr(model.config, "hidden_size", 0) or 0
    return tokens * width * 4 > ACTIVATIONS_SHARE * psutil.virtual_memory().available


class Activations:
    """A block's calibration inputs, (args, kwargs) per batch: a list in memory, or, for a streamed model
    whose activations would not fit, one file per batch in a temporary folder (read back on use; exact)."""

    def __init__(self, on_disk: bool = False):
        import tempfile

        self.items: list = []
        self.folder = tempfile.mkdtemp(prefix="slimctl-activations-") if on_disk else None

    def _put(self, i: int, value) -> Any:
        if self.folder is None:
            return value
        path = f"{self.folder}/{i}.pt"
        torch.save(value, path)
        return path

    def append(self, value) -> None:
        self.items.append(self._put(len(self.items), value))

    def __setitem__(self, i: int, value) -> None:
        self.items[i] = self._put(i, value)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        v = self.items[i]
        return torch.load(v, weights_only=False) if self.folder is not None else v  # our own files, this run

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        if self.folder is not None:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)


def _each_block(model, prefix, blocks, st, inputs, on_block, track, after_block) -> list[Any]:
    results = []
    for i in track(range(len(blocks)), "blocks", len(blocks)):
        block = st.load(f"{prefix}.{i}") if st else blocks[i]
        results.append(on_block(i, f"{prefix}.{i}", block, inputs))
        from ..quant.layers import dequantized_once

        last = i + 1 == len(blocks)  # no block reads the last one's outputs
        with torch.inference_mode(), dequantized_once(block):  # each input replaced by its output in turn
            for j, (a, k) in enumerate([] if last else inputs):
                inputs[j] = with_hidden(a, k, run_block(block, a, k))
        if after_block is not None:
            after_block(i, f"{prefix}.{i}", block)
        if st:  # a streamed block is written to the spill folder and its memory freed
            st.release(f"{prefix}.{i}")
    return results


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
        self._half: set[str] = set()  # Hessians accumulated by a symmetric rank-k update: lower triangle only
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
            with stages.stage(stages.STATISTICS, (1.0 if syrk else 2.0) * m * d * d if self._want_hessian else 4.0 * m * d):
                self.sq_norm[name] += (x * x).sum(0)
                self.sum[name] += x.sum(0, dtype=torch.float64)
                self.absmax[name] = torch.maximum(self.absmax[name], x.abs().amax(0))
                if self._want_hessian:
                    n = self.n[name]
                    h = self.hessian.setdefault(name, torch.zeros(d, d))
                    if syrk is not None:  # H ← n/(n+m) H + 2/(n+m) XᵀX, its lower triangle only (finish mirrors it)
                        syrk(2.0 / (n + m), x.contiguous().numpy().T, beta=n / (n + m), c=h.numpy().T, trans=0,
                             lower=0, overwrite_c=1)
                        self._half.add(name)
                    else:  # torch's GEMM (see SCIPY_MIN_WIDTH)
                        h.mul_(n / (n + m))
                        xs = x * (2.0 / (n + m)) ** 0.5
                        h.addmm_(xs.T, xs)
            self.n[name] += m
        return fn

    def finish(self) -> "InputStats":
        """Remove the hooks; each follower gets its leader's statistics (the same tensors)."""
        self.remove()
        for name in self._half:
            _mirror_lower(self.hessian[name])
        self._half = set()
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


def block_stats(block: nn.Module, inputs: list, layers: dict[str, nn.Linear], hessian: bool = False) -> "InputStats":
    """Input statistics of `layers` (inside `block`) over one pass of the block's calibration inputs."""
    def run():
        with torch.inference_mode():
            for a, k in inputs:
                run_block(block, a, k)

    return collect(layers, run, hessian)


def calibrated(model: nn.Module, targets: dict[str, nn.Linear], batches: list[dict],
               slim_layers: Callable[[dict[str, nn.Linear], "InputStats"], None], hessian: bool = False,
               track=lambda it, desc, total: it, leftover: str = "full-pass",
               unseen: Callable[[dict[str, nn.Linear]], None] | None = None) -> list[str]:
    """The calibrated driver of Wanda, SparseGPT and GPTQ: block by block, `slim_layers(layers, stats)`
    on the targets inside the block, from their input statistics; the block's outputs (after slimming)
    feed the next block. Targets outside the repeated blocks (an LM head, a pooler) follow `leftover`:
    "full-pass" gathers their statistics in one pass of the whole slimmed model and slims them too;
    "return" leaves them to the caller. Layers that saw no calibration token (an expert the router never
    chose) go to `unseen`, the caller's data-free fallback, when given. Returns the targets left over."""
    done: set[str] = set()

    def on_block(i, prefix, block, inputs):
        mine = {n: m for n, m in targets.items() if n.startswith(prefix + ".")}
        if mine:
            stats = block_stats(block, inputs, mine, hessian=hessian)
            blind = {n: m for n, m in mine.items() if stats.n[n] == 0} if unseen else {}
            if blind:
                unseen(blind)
            if len(blind) < len(mine):
                slim_layers({n: m for n, m in mine.items() if n not in blind}, stats)
            done.update(mine)

    sequential(model, batches, on_block, track, batch_tokens=BATCH_TOKENS)
    rest = {n: m for n, m in targets.items() if n not in done}
    if not rest or leftover == "return":
        return list(rest)
    from ..stream.skeleton import refuse, stream_of

    if stream_of(model):
        refuse(f"calibrating layers outside the repeated blocks ({', '.join(list(rest)[:3])})")
    stats = collect(rest, lambda: forward_all(model, batches), hessian)
    slim_layers(rest, stats)
    return []


def unseen_note(method: str, names: list[str], instead: str) -> str:
    """The note for layers that saw no calibration token and what was done with them instead."""
    return (f"{method}: {len(names)} layers saw no calibration token ({', '.join(names[:3])}"
            f"{', …' if len(names) > 3 else ''}; experts the router never chose on this text); {instead}; "
            "more calibration text (calib_samples, calib_seq_len) reaches more of them")


def raised_dampening(used: dict[str, float], asked: float, ctx) -> dict[str, dict[str, float]]:
    """The layers whose Hessian needed more dampening than asked: a note, and the step's record."""
    raised = {k: v for k, v in used.items() if v > asked}
    if raised:
        ctx.notes.append(f"{len(raised)} layers needed dampening above {asked:g} for a positive-definite Hessian "
                         f"(up to {max(raised.values()):g}): {', '.join(list(raised)[:3])}")
    return {"dampening_raised": raised} if raised else {}


def summary(batches: list[dict]) -> dict[str, int]:
    """What a calibrated step records about its data."""
    return {"samples": len(batches), "tokens": sum(b["input_ids"].numel() for b in batches)}


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
