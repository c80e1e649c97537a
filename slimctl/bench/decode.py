"""Greedy decode for the bench, two ways: eager on transformers' dynamic KV cache (as a plain
`model(...)` loop runs it), and compiled: a static KV cache with the one-token decode step under
`torch.compile` (CPU: Inductor's C++ code; CUDA: mode "reduce-overhead", i.e. CUDA graphs), so
fixed shapes compile once and Python/launch overhead leaves the step.
"""
from __future__ import annotations

import inspect
import os
import shutil
import time

import torch

from ..errors import UnsupportedError
from ..quant.kvcache import cache_arg, cache_of, per_request


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor would use on the CPU, or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def can_compile(device: str) -> tuple[bool, str]:
    """(True, "") where a compiled decode can be built here, else (False, why)."""
    if device == "cpu" and cxx_compiler() is None:
        return False, "torch.compile's Inductor needs a C++ compiler on the CPU and none was found (install g++, or set CXX)"
    if not hasattr(torch, "compile"):
        return False, f"torch {torch.__version__} has no torch.compile"
    return True, ""


class EagerDecoder:
    """The plain loop: dynamic cache, a growing attention mask, one forward per token."""

    mode = "eager"

    def __init__(self, model, kv_cache: str = "fp"):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.cache_arg = cache_arg(model)
        self._fresh_cache = per_request(model, kv_cache)  # a quantized cache per request; llama.cpp's q8_0 / q4_0

    def prefill(self, ids, mask):
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **self.keep, **self._fresh_cache())
        self.past, self.mask = cache_of(out), mask
        return out.logits[:, -1:].argmax(-1)

    def step(self, nxt):
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = self.model(input_ids=nxt, attention_mask=self.mask, use_cache=True, **{self.cache_arg: self.past})
        self.past = cache_of(out)
        return out.logits[:, -1:].argmax(-1)


class CompiledDecoder:
    """Static KV cache sized for the request; eager prefill, compiled decode step (rows unpadded)."""

    mode = "compiled"

    def __init__(self, model, batch: int, max_len: int, device: str):
        from transformers import StaticCache

        ok, why = can_compile(device)
        if not ok:
            raise UnsupportedError(why)
        self.model, self.device = model, device
        self.cache_arg = cache_arg(model)
        try:
            self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        except Exception as e:  # noqa: BLE001  architectures without a static-cache layout
            raise UnsupportedError(f"no static KV cache for {type(model).__name__} ({type(e).__name__}: {e})") from None
        self.compiled = torch.compile(self._forward, dynamic=False, fullgraph=False,
                                      mode="reduce-overhead" if device == "cuda" else None)
        self.compile_seconds: float | None = None

    def _forward(self, ids, pos):
        return self.model(input_ids=ids, use_cache=True, cache_position=pos, **{self.cache_arg: self.cache}).logits

    def prefill(self, ids, mask):
        self.cache.reset()
        self.pos = ids.shape[1]
        out = self.model(input_ids=ids, use_cache=True, cache_position=torch.arange(self.pos, device=ids.device),
                         logits_to_keep=1, **{self.cache_arg: self.cache})
        return out.logits[:, -1:].argmax(-1)

    def step(self, nxt):
        pos = torch.tensor([self.pos], device=nxt.device)
        if self.device == "cuda" and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()
        t0 = time.perf_counter() if self.compile_seconds is None else None
        logits = self.compiled(nxt, pos)
        if t0 is not None:  # the first call compiles: its time is reported apart, never as latency
            self.compile_seconds = time.perf_counter() - t0
        self.pos += 1
        return logits[:, -1:].argmax(-1)


def cache_bytes(cache) -> int | None:
    """Bytes a transformers cache holds (codes and scales for a quantized one), or None for another kind."""
    if cache is None or not hasattr(cache, "layers"):
        return None
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (getattr(layer, "keys", None),
               getattr(layer, "values", None)) if isinstance(t, torch.Tensor))


def greedy(decoder, ids, mask, n: int) -> list[list[int]]:
    """n greedy tokens per row (for tests: compiled and eager must agree)."""
    with torch.inference_mode():
        nxt = decoder.prefill(ids, mask)
        toks = [nxt]
        for _ in range(n - 1):
            nxt = decoder.step(nxt)
            toks.append(nxt)
    return torch.cat(toks, dim=1).tolist()
