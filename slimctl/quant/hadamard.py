"""Hadamard matrices of the sizes models use (Sylvester x Paley constructions) and the seeded randomised
orthogonal rotations built from them, for the `rotate` step (QuaRot / SpinQuant's R1 and R2)."""
from __future__ import annotations

import functools

import torch


def _prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i), the quadratic character mod a prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q ≡ 3 (mod 4): H = I + S, S = [[0, 1ᵀ], [−1, Q]] skew."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q ≡ 1 (mod 4), from the symmetric conference matrix C."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _base(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from one Paley construction (prime q only), or None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if _prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if m % 2 == 0 and _prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


@functools.cache
def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix (entries ±1, H Hᵀ = n I) of order n = m · 2^k with m from Paley, or None."""
    m = n
    while True:
        base = _base(m)
        if base is not None:
            h = base
            while h.shape[0] < n:
                h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
            return h
        if m % 2:
            return None
        m //= 2


def block_size(n: int) -> int:
    """The largest order ≤ n that divides n and has a Hadamard matrix: n itself when one exists."""
    for b in range(n, 0, -1):
        if n % b == 0 and hadamard(b) is not None:
            return b
    return 1


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation(n: int, kind: str, seed: int) -> tuple[torch.Tensor, str]:
    """A seeded n x n orthogonal matrix (float64) and what it is: `hadamard` is diag(±1) · H / √b, H a
    Hadamard matrix of order n, or block-diagonal with blocks of order b when no order-n matrix is known;
    `random` a Haar-random orthogonal matrix."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return random_orthogonal(n, g), f"random orthogonal {n}x{n}"
    b = block_size(n)
    h = hadamard(b) / b ** 0.5
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    full = torch.block_diag(*[h] * (n // b)) if b < n else h
    what = f"randomised Hadamard {n}x{n}" if b == n else f"randomised block-diagonal Hadamard ({n // b} blocks of {b})"
    return signs[:, None] * full, what
