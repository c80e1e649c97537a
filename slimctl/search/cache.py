"""The search cache under OUT/.cache: quick looks and full runs keyed by the model's files, the machine,
the eval and bench settings, the seed and the steps, so a re-run (or a killed one) resumes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_hash(folder: Path) -> str:
    """Config plus each weight file's size and mtime: cheap, and changes whenever the weights do."""
    parts = []
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and (p.suffix in (".json", ".safetensors", ".onnx")):
            st = p.stat()
            parts.append((p.name, st.st_size, int(st.st_mtime)))
    return digest(parts)


def environment(device: str) -> dict[str, Any]:
    """What about the machine makes a measurement comparable: versions, CPU, threads, device, GPU."""
    from ..results.report import environment as full

    env = full(0, device)
    return {k: env.get(k) for k in ("versions", "cpu", "threads", "device", "gpu")}


class Cache:
    """JSON files under `root`, each named by the digest of a shared key plus what it measured."""

    def __init__(self, root: Path, key: dict[str, Any]):
        self.root, self.key = Path(root), key

    def quick_path(self, kind: str, what: Any, settings: dict[str, Any]) -> Path:
        """A pre-filter or sensitivity result."""
        return self.root / kind / f"{digest({**self.key, **settings, kind: what})}.json"

    def run_path(self, steps: list[dict[str, Any]]) -> Path:
        """A full run's report."""
        return self.root / digest({**self.key, "steps": steps}) / "report.json"

    @staticmethod
    def get(path: Path) -> Any | None:
        return json.loads(path.read_text()) if path.exists() else None

    @staticmethod
    def put(path: Path, value: Any) -> None:
        from ..render import write_text

        write_text(path, json.dumps(value, default=str))
