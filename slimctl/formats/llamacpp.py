"""llama.cpp as a runtime: a .gguf file run by llama-cpp-python behind the interface slimctl uses of a
transformers causal LM (model(input_ids=…) → .logits, an incremental cache, .config), so `slimctl eval`
scores perplexity on slimctl's own token stream and windows and `slimctl bench` measures prefill and
decode exactly as for a torch model. One sequence at a time (batch 1), on the CPU, with as many
threads as torch uses here."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, UnsupportedError

INSTALL = ("llama.cpp runs through llama-cpp-python, which compiles on install: scripts/setup.sh builds it "
           "(or pip install 'slimctl[llamacpp]' with CMAKE_ARGS as docs/artifacts.md says)")


def llama_cpp():
    try:
        import llama_cpp as mod
    except ImportError:
        raise UnsupportedError(INSTALL) from None
    return mod


class _State:
    """What LlamaCppModel hands back as its cache: how many tokens llama.cpp's context holds."""

    def __init__(self, n: int):
        self.n = n


class LlamaCppModel(nn.Module):
    artifact_format = "gguf"
    supports_kv_cache = True

    def __init__(self, path: Path, config, n_ctx: int = 2048):
        super().__init__()
        self.path, self.config, self.n_ctx = Path(path), config, n_ctx
        self._llm = None
        self.kv_cache = "fp"

    def set_kv_cache(self, kind: str) -> None:
        """The KV cache type llama.cpp's context stores (fp: f16, int8: q8_0, int4: q4_0); made anew if it changes."""
        if kind != self.kv_cache:
            self.kv_cache, self._llm = kind, None

    def _kv_args(self, mod) -> dict:
        if self.kv_cache == "fp":
            return {}
        t = {"int8": mod.GGML_TYPE_Q8_0, "int4": mod.GGML_TYPE_Q4_0}[self.kv_cache]
        return {"type_k": t, "type_v": t, "flash_attn": True}  # a quantized V cache needs flash attention

    def llm(self):
        if self._llm is None:
            mod = llama_cpp()
            try:
                self._llm = mod.Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=min(self.n_ctx, 512),
                                      n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(),
                                      logits_all=True, verbose=False, **self._kv_args(mod))
            except Exception as e:  # noqa: BLE001  llama-cpp-python raises ValueError for a file it cannot load
                raise ModelLoadError(f"llama.cpp could not load {self.path}: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}") from None
        return self._llm

    def to(self, *args, **kwargs):
        dev = args[0] if args else kwargs.get("device")
        if dev is not None and str(dev).startswith("cuda"):
            raise UnsupportedError("slimctl runs GGUF files with llama.cpp on the CPU only; use --device cpu")
        return self

    def forward(self, input_ids, attention_mask=None, cache=None, past_key_values=None, use_cache=None,
                logits_to_keep=None, **unused):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if input_ids.shape[0] != 1:
            raise UnsupportedError("llama.cpp runs one sequence at a time here: use --batch-size 1")
        state = cache if cache is not None else past_key_values
        ids = input_ids[0].tolist()
        fresh = not isinstance(state, _State) or self._llm is None or state.n != self._llm.n_tokens
        if fresh and len(ids) > self.n_ctx:
            self._grow(len(ids))
        llm = self.llm()
        if fresh:
            llm.reset()  # a fresh sequence (a perplexity window, a new request)
        start = llm.n_tokens
        if start + len(ids) > self.n_ctx:
            raise UnsupportedError(f"{start + len(ids)} tokens exceed the llama.cpp context of {self.n_ctx}")
        llm.eval(ids)
        first = llm.n_tokens - (1 if logits_to_keep else len(ids))
        logits = torch.from_numpy(llm.scores[first:llm.n_tokens].copy())[None]
        field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(logits=logits, **{field: _State(llm.n_tokens) if use_cache else None})

    def _grow(self, need: int) -> None:
        """A longer sequence than the context holds: a new context, up to the model's positions (with room to decode)."""
        limit = getattr(self.config, "max_position_embeddings", None) or need
        if need <= limit:
            self.n_ctx, self._llm = min(limit, max(2 * self.n_ctx, need + 256)), None

    def weight_bytes(self) -> int:
        return self.path.stat().st_size

    def extra_repr(self) -> str:
        return f"{self.path.name} (llama.cpp), {self.weight_bytes() / 2**20:.1f} MB"


def load_gguf(path: Path, n_ctx: int = 2048) -> tuple[LlamaCppModel, Any]:
    """The model (run by llama.cpp) and a transformers tokenizer read from the GGUF's own vocabulary."""
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

    llama_cpp()  # a clear error before anything else when llama-cpp-python is missing
    try:
        deci = _deci_config(path)
        config = deci or AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        # AutoTokenizer looks the config's model type up again, which 'deci' is not; the fast tokenizer reads the vocabulary
        tok = (PreTrainedTokenizerFast if deci else AutoTokenizer).from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001  transformers' GGUF reader raises many types for a bad file
        raise ModelLoadError(f"could not read {path} as GGUF ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    model = LlamaCppModel(path, config, n_ctx=min(n_ctx, getattr(config, "max_position_embeddings", n_ctx) or n_ctx))
    model.llm()
    return model.eval(), tok


def _deci_config(path: Path):
    """A LlamaConfig for a GGUF of llama.cpp's 'deci' architecture (how slimctl exports a Llama-layout model with
    per-layer FFN widths), which transformers reads but has no config class for; None for any other architecture."""
    from transformers import LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    import gguf

    field = gguf.GGUFReader(path).get_field("general.architecture")
    if field is None or field.contents() != "deci":
        return None
    cfg = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    widths = cfg.get("intermediate_size")
    cfg["model_type"] = "llama"
    if isinstance(widths, list):
        cfg.update(intermediate_size=max(widths), slimctl_layer_sizes={"intermediate_size": widths})
    return LlamaConfig(**cfg)


class LlamaCpp:
    """The formats-protocol face of a GGUF file in memory (what bench and reports ask of a model)."""
    name = "gguf"
    loads_with = "llama.cpp (llama-cli, llama-server, llama-cpp-python), or slimctl"

    def detect(self, folder: Path, config: dict[str, Any], meta: dict[str, Any]) -> bool:
        return False  # a GGUF is a file, handled by models.load before folders are looked at

    def holds(self, model) -> bool:
        return isinstance(model, LlamaCppModel)

    def save(self, model, folder: Path) -> None:
        raise UnsupportedError("a GGUF model is written by slimctl export, not saved as a folder")

    def state_bytes(self, model) -> int:
        return model.weight_bytes()

    def bench_meta(self, model) -> dict[str, Any]:
        mod = llama_cpp()
        return {"backend": "llama.cpp", "llama_cpp_python": getattr(mod, "__version__", "?"),
                "llama_threads": torch.get_num_threads()}


def quantize(src: Path, dst: Path, ftype: str = "q4_0") -> None:
    """llama.cpp's own quantizer (llama_model_quantize) on a float GGUF: the peer slimctl compares with."""
    mod = llama_cpp()
    params = mod.llama_model_quantize_default_params()
    params.ftype = {"q4_0": mod.LLAMA_FTYPE_MOSTLY_Q4_0, "q8_0": mod.LLAMA_FTYPE_MOSTLY_Q8_0,
                    "q4_1": mod.LLAMA_FTYPE_MOSTLY_Q4_1}[ftype]
    params.nthread = torch.get_num_threads()
    import ctypes

    rc = mod.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise UnsupportedError(f"llama.cpp could not quantize {src} to {ftype} (code {rc})")
