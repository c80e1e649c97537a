"""Entry point of an isolated bench: `python -m slimctl.bench.worker FOLDER SPEC_JSON OUT_JSON [LOAD_OPTIONS_JSON]`."""
from __future__ import annotations

import json
import sys
import warnings


def main(argv: list[str]) -> int:
    folder, spec_json, out = argv[:3]
    load_options = json.loads(argv[3]) if len(argv) > 3 else {}
    from ..errors import SlimctlError
    from ..models import load
    from ..recipe import BenchSpec
    from . import bench_model

    warnings.simplefilter("ignore")
    try:
        loaded = load(folder, **load_options)
        res = bench_model(loaded.model, loaded.tokenizer, loaded.kind, BenchSpec.model_validate_json(spec_json), loaded.path)
    except SlimctlError as e:
        json.dump({"error": str(e), "exit_code": e.exit_code}, open(out, "w"))
        return e.exit_code
    except MemoryError:
        json.dump({"error": "out of memory while benchmarking; try a smaller batch size or sequence length",
                   "exit_code": 2}, open(out, "w"))
        return 2
    json.dump(res, open(out, "w"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
