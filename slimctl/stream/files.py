"""Reading a model folder's safetensors files tensor by tensor: which file holds each tensor (one file, or shards
and an index), each file's tensor table, and the tensors of one unit read with plain file reads into fresh
memory (never mapped), so a streamed unit costs exactly its bytes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelLoadError


class TensorFiles:
    """Which safetensors file holds each tensor of a model folder (one file, or shards + index).
    Tensors are read with plain file reads (read_tensors), never mapped."""

    def __init__(self, folder: Path, transform: Callable[[dict, str], dict] | None = None):
        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        self.header: dict[str, dict] = {}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{folder} has no *.safetensors weights; --stream reads safetensors only")
        for f in files:
            for k, info in read_header(f).items():
                self.where[k] = f
                self.header[k] = info
        self.transform = transform  # (tensors of one unit with full names, unit prefix) -> slimctl's names

    def dtype(self, name: str) -> str:
        return self.header[name]["dtype"]

    def read(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix.` (or named `prefix`), with full names."""
        names = [k for k in self.where if k.startswith(prefix + ".") or k == prefix]
        out: dict[str, torch.Tensor] = {}
        for f in sorted({self.where[k] for k in names}):
            out.update(read_tensors(f, [k for k in names if self.where[k] == f], self.header))
        return self.transform(out, prefix) if self.transform else out


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_header(path: Path) -> dict[str, dict]:
    """A safetensors file's tensor table: name -> dtype, shape, absolute byte range."""
    import struct

    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError(f"header length {n} exceeds the file")
            table = json.loads(f.read(n))
            table.pop("__metadata__", None)
            for info in table.values():
                b, e = info["data_offsets"]
                info["range"] = (8 + n + b, 8 + n + e)
        except (struct.error, ValueError, TypeError, KeyError, AttributeError) as e:
            raise ModelLoadError(f"{path} is not a safetensors file ({str(e)[:120]})") from None
    end = max((info["range"][1] for info in table.values()), default=0)
    if end > size:
        raise ModelLoadError(f"{path} is not a safetensors file (truncated: its tensors end at byte {end:,}, the file at {size:,})")
    return table


def read_tensors(path: Path, names: list[str], header: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of one file, each read into its own fresh memory with plain reads: no
    mapping of the file, so a read costs exactly the tensors' bytes (the file stays in the page cache)."""
    header = header or read_header(path)
    out = {}
    with open(path, "rb") as f:
        for k in sorted(names, key=lambda k: header[k]["range"][0]):
            info = header[k]
            if info["dtype"] not in DTYPES:
                raise ModelLoadError(f"{path}: tensor {k} has dtype {info['dtype']}, which slimctl cannot stream")
            b, e = info["range"]
            raw = torch.empty(e - b, dtype=torch.uint8)
            f.seek(b)
            if e > b and f.readinto(memoryview(raw.numpy()).cast("B")) != e - b:
                raise ModelLoadError(f"{path} is truncated (tensor {k})")
            out[k] = raw.view(DTYPES[info["dtype"]]).reshape(info["shape"]) if e > b else \
                torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
    return out


def stored_dtype(files: TensorFiles) -> torch.dtype:
    """The dtype of the first floating-point tensor on disk (what an in-memory load with dtype="auto" gets)."""
    for name in sorted(files.where):
        dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(files.dtype(name))
        if dt is not None:
            return dt
    return torch.float32
