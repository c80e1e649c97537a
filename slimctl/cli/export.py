"""`slimctl export`: a slimmed artifact (or a float Llama-family model) as a file another runtime runs."""
from __future__ import annotations

from pathlib import Path

import typer

from . import _common as C


def export(
    model: str = typer.Argument(..., help="A slimctl artifact (runs/x/model), a local HF folder, a built-in name or hub id."),
    format_: str = typer.Option("gguf", "--format", help="gguf: one file for llama.cpp (the families with a gguf column in `slimctl models --families`)."),
    out: Path = typer.Option(..., "--out", "-o", help="The file to write, e.g. model.gguf."),
    embeddings: str = typer.Option("q8_0", "--embeddings", help="Token embedding type: q8_0 (llama.cpp's default), f16 or f32."),
    float_type: str = typer.Option("f16", "--float-type", help="Float Linear layers (all of them in a float model): f16, f32 or bf16."),
    requantize: bool = typer.Option(False, "--requantize", help="Quantize again what cannot be packed exactly (asymmetric, "
                                    "non-fp16 scales), with a warning, instead of refusing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file at --out."),
    as_json: bool = C.JSON_OPT, allow_pickle: bool = C.PICKLE_OPT, trust_remote_code: bool = C.REMOTE_OPT,
    allow_non_finite: bool = C.NONFINITE_OPT,
):
    """Write a model as a GGUF file for llama.cpp, packing slimctl's int4/int8 codes exactly into Q4_0/Q8_0.

    Examples:
    [bold]slimctl quantize smollm2-135m --method gptq --bits 4 --group-size 32 --set fp16_scales=true --out runs/g32[/bold]
    [bold]slimctl export runs/g32/model --format gguf --out runs/g32/model.gguf[/bold]
    A float model (for llama.cpp's own quantizer): [bold]slimctl export smollm2-135m --float-type f32 --embeddings f32 --out smol-f32.gguf[/bold]
    """
    from ..errors import OutputError
    from ..formats.exporters import exporter
    from ..models import load
    from ..render import text
    from ..specs import ExportSpec

    spec = C.typed(ExportSpec, format=format_, embeddings=embeddings, float_type=float_type, requantize=requantize)
    ex = exporter(spec.format)
    if out.is_dir():
        raise OutputError(f"--out {out} is a folder; give the .gguf file to write")
    if out.exists() and not overwrite:
        raise OutputError(f"--out {out} exists; pass --overwrite to replace it")
    ui = C.UI()
    loaded = load(model, progress=ui.say, **C.load_opts(allow_pickle, trust_remote_code, allow_non_finite))
    ex.check(loaded.model.config)
    ui.say(f"writing {out}")
    res = ex.write(loaded, out, spec)
    for n in res.notes:
        C.warn(n)
    C.emit(ex.summary(res), as_json, text.export)
