"""Entry point of an isolated bench: `python -m slimctl.bench.worker FOLDER SPEC_JSON OUT_JSON [OPTIONS_JSON]`.

OPTIONS_JSON: load options (allow_pickle, trust_remote_code) plus `dtype` (cast before measuring),
`config_only` (FOLDER holds only config.json: random-initialised weights), `steps` (recipe steps
applied before measuring: a slimmed variant) and `max_memory_mb` (on
CPU an address-space cap standing in for device memory; on CUDA a cap on the caching allocator, so a
larger point runs out of GPU memory for real)."""
from __future__ import annotations

import json
import sys
import warnings

from ..heap import own_heap

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_random(folder: str, dtype: str | None, device: str = "cpu"):
    """A model of the architecture in folder/config.json with random weights (speed and memory only),
    initialised on the device it is measured on (on a GPU that takes a second, not a minute)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import LoadedModel
    from ..kinds import CAUSAL_LM

    cfg = AutoConfig.from_pretrained(folder)
    dt = getattr(torch, DTYPES[dtype or "fp32"])
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dt if dt.is_floating_point else torch.float32)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(prev)
    return LoadedModel(model=model.eval(), tokenizer=None, kind=CAUSAL_LM, source="config", path=folder, meta={})


def cap_memory(max_mb: float) -> None:
    """Let this process grow by at most the room left under max_mb of RSS (RLIMIT_AS)."""
    import resource

    from ..machine import status_kb

    vm, rss = (status_kb("VmSize") or 0) * 1024, (status_kb("VmRSS") or 0) * 1024
    room = max(int(max_mb * 2**20) - rss, 0)
    resource.setrlimit(resource.RLIMIT_AS, (vm + room, vm + room))


def cap_cuda_memory(max_mb: float) -> None:
    """Let torch's CUDA allocator hand out at most max_mb (an address-space cap would break CUDA itself)."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(max_mb * 2**20 / total, 1.0), 0)


def apply_data_free(model, kind: str, steps: list[dict]):
    """Apply recipe steps that need no calibration text (the model has random weights and no tokenizer)."""
    from ..steps import UI, apply_steps
    from ..recipe import from_dict

    model, _, _ = apply_steps(model, None, from_dict({"version": 1, "steps": steps}, "--recipe"), kind, UI())
    return model


def main(argv: list[str]) -> int:
    own_heap()  # a process of slimctl's own: its heap is frozen before the model loads
    folder, spec_json, out = argv[:3]
    options = json.loads(argv[3]) if len(argv) > 3 else {}
    dtype, config_only, max_mb = options.pop("dtype", None), options.pop("config_only", False), options.pop("max_memory_mb", None)
    steps = options.pop("steps", None)
    from ..errors import SlimctlError
    from ..models import load
    from ..specs import BenchSpec
    from .runner import bench_model

    warnings.simplefilter("ignore")
    try:
        spec = BenchSpec.model_validate_json(spec_json)
        # slimming runs on the CPU (as in `slimctl run`); bench_model moves the result to the device
        loaded = build_random(folder, dtype, "cpu" if steps else spec.device) if config_only else load(folder, **options)
        if dtype and not config_only:
            import torch

            from ..techniques.cast import cast_model

            cast_model(loaded.model, getattr(torch, DTYPES[dtype]))
        if steps:
            loaded.model = apply_data_free(loaded.model, loaded.kind, steps)
        if max_mb and spec.roofline:  # the peaks' large copy and GEMM must not count against the model's memory cap
            from .roofline import peaks

            param = next(loaded.model.parameters(), None)
            peaks(spec.device, str(param.dtype).replace("torch.", "") if param is not None else "float32", spec.remeasure_peaks)
            spec = spec.model_copy(update={"remeasure_peaks": False})  # measured just now, before the cap
            if spec.device == "cuda":
                import torch

                torch.cuda.empty_cache()
        if max_mb:
            cap_cuda_memory(max_mb) if spec.device == "cuda" else cap_memory(max_mb)
        res = bench_model(loaded.model, loaded.tokenizer, loaded.kind, spec, loaded.path)
        if dtype:
            res.dtype = DTYPES[dtype]
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
    json.dump(res.to_json(), open(out, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
