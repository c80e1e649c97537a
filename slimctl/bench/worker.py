"""Entry point of an isolated bench: `python -m slimctl.bench.worker FOLDER SPEC_JSON OUT_JSON [OPTIONS_JSON]`.

OPTIONS_JSON: load options (allow_pickle, trust_remote_code) plus `dtype` (cast before measuring),
`config_only` (FOLDER holds only config.json: random-initialised weights) and `max_memory_mb` (an
address-space cap standing in for device memory on CPU)."""
from __future__ import annotations

import json
import sys
import warnings

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_random(folder: str, dtype: str | None):
    """A model of the architecture in folder/config.json with random weights (speed and memory only)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import CAUSAL_LM, LoadedModel

    cfg = AutoConfig.from_pretrained(folder)
    dt = getattr(torch, DTYPES[dtype or "fp32"])
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dt if dt.is_floating_point else torch.float32)
    try:
        model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(prev)
    return LoadedModel(model=model.eval(), tokenizer=None, kind=CAUSAL_LM, source="config", path=folder, meta={})


def cap_memory(max_mb: float) -> None:
    """Let this process grow by at most the room left under max_mb of RSS (RLIMIT_AS)."""
    import resource

    from .measure import _status_kb

    vm, rss = (_status_kb("VmSize") or 0) * 1024, (_status_kb("VmRSS") or 0) * 1024
    room = max(int(max_mb * 2**20) - rss, 0)
    resource.setrlimit(resource.RLIMIT_AS, (vm + room, vm + room))


def main(argv: list[str]) -> int:
    folder, spec_json, out = argv[:3]
    options = json.loads(argv[3]) if len(argv) > 3 else {}
    dtype, config_only, max_mb = options.pop("dtype", None), options.pop("config_only", False), options.pop("max_memory_mb", None)
    from ..errors import SlimctlError
    from ..models import load
    from ..recipe import BenchSpec
    from . import bench_model

    warnings.simplefilter("ignore")
    try:
        loaded = build_random(folder, dtype) if config_only else load(folder, **options)
        if dtype and not config_only:
            import torch

            from ..techniques.cast import cast_model

            cast_model(loaded.model, getattr(torch, DTYPES[dtype]))
        if max_mb:
            cap_memory(max_mb)
        res = bench_model(loaded.model, loaded.tokenizer, loaded.kind, BenchSpec.model_validate_json(spec_json), loaded.path)
        if dtype:
            res["dtype"] = DTYPES[dtype]
    except SlimctlError as e:
        json.dump({"error": str(e), "exit_code": e.exit_code}, open(out, "w"))
        return e.exit_code
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "memory" not in str(e).lower() and "alloc" not in str(e).lower():
            raise
        s = BenchSpec.model_validate_json(spec_json)
        point = f"batch {s.batch_size or 'default'} x seq {s.seq_len or 'default'}"
        json.dump({"error": f"out of memory; try a smaller --batch-size or --seq-len (this point: {point})", "exit_code": 2},
                  open(out, "w"))
        return 2
    json.dump(res, open(out, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
