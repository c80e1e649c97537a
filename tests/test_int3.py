"""int3: packing is exact and 3 bits per code as stored, compressed-tensors' dense layout is matched bit for bit,
an int3 artifact reloads in slimctl and in plain transformers with the same logits, runs on the int4 kernels
with the dequantize path's result, and exports to GGUF exactly as Q4_0."""
from __future__ import annotations

import json

import pytest
import torch

from slimctl.quant.layers import WeightOnlyLinear, bits_per_weight
from slimctl.quant.integer import QScheme, pack_int3, unpack_int3


@pytest.mark.parametrize("symmetric", [True, False])
def test_int3_pack_unpack_is_exact_and_three_bits_per_code(symmetric):
    lo, hi = (-4, 3) if symmetric else (0, 7)
    codes = torch.randint(lo, hi + 1, (6, 96), generator=torch.Generator().manual_seed(0))
    packed = pack_int3(codes, QScheme(3, 32, symmetric))
    assert packed.dtype == torch.uint8 and packed.shape == (6, 96 * 3 // 8)
    assert torch.equal(unpack_int3(packed, symmetric).long(), codes)
    # first code in the lowest bits: codes 1, 2 (unsigned) make the first byte 0b010_001
    one = torch.tensor([[1, 2, 0, 0, 0, 0, 0, 7]])
    assert pack_int3(one, QScheme(3, 8, False)).tolist() == [[0b010001, 0, 0b11100000]]


@pytest.mark.parametrize("dim", [0, 1])
def test_int3_matches_compressed_tensors_dense_packing(dim):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from slimctl.formats.ctformat import pack_int32, unpack_int32

    codes = torch.randint(-4, 4, (24, 40), generator=torch.Generator().manual_seed(1))
    ours = pack_int32(codes, 3, dim)
    assert torch.equal(ours, ct.pack_to_int32(codes.to(torch.int8), 3, packed_dim=dim))
    assert torch.equal(unpack_int32(ours, 3, tuple(codes.shape), dim).long(), codes)


def _layer(symmetric: bool, group: int = 32) -> WeightOnlyLinear:
    from slimctl.quant.integer import rtn

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=True)
    codes, scale, zero = rtn(lin.weight.detach(), QScheme(3, group, symmetric), group)
    return WeightOnlyLinear.from_codes(lin, codes, scale, zero, 3, group)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int3_layer_dequantizes_to_its_grid_and_counts_its_stored_bits(symmetric):
    layer = _layer(symmetric)
    w = layer.dequantized(torch.float32)
    s = layer.weight_scale.repeat_interleave(32, 1)
    steps = w / s if symmetric else w / s + layer.weight_zero_point.float().repeat_interleave(32, 1)
    assert torch.allclose(steps, steps.round(), atol=1e-4)  # every weight on its group's 3-bit grid
    assert steps.round().min() >= (-4 if symmetric else 0) and steps.round().max() <= (3 if symmetric else 7)
    model = torch.nn.Sequential(layer)
    expected = 3 + 32 / 32 + (0 if symmetric else 8 / 32)  # codes + float32 scale (+ uint8 zero) per group of 32
    assert bits_per_weight(model, ["0"]) == pytest.approx(expected)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int3_runs_on_the_int4_kernel_with_the_dequantize_paths_result(symmetric):
    from slimctl.quant import kernels

    if not kernels.bf16_fast("cpu")[0]:
        pytest.skip(f"no fused int4 CPU kernel here: {kernels.bf16_fast('cpu')[1]}")
    layer = _layer(symmetric)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), layer.dequantized(torch.float32), layer.bias)
    kernel, why = kernels.choose(layer, "cpu")
    assert kernel == "int4-cpu", why
    layer.set_kernel(kernel, kernels._pack(layer, kernel, torch.bfloat16) | {"dtype": torch.bfloat16}, kernels.fused_forward)
    got = layer(x).float()
    assert torch.allclose(got, ref, atol=0.05 * ref.abs().max().item()), (got - ref).abs().max()


def test_int3_artifact_reloads_in_slimctl_and_plain_transformers(tiny_llama, tmp_path, fast_recipe):
    pytest.importorskip("compressed_tensors")
    import subprocess
    import sys

    from slimctl.workflow import pipeline
    from slimctl import recipe as R
    from slimctl.models import load

    from test_quant import _CT_RELOAD

    out = tmp_path / "o"
    rep = pipeline.run(R.load(fast_recipe([{"method": "gptq", "bits": 3, "group_size": 32, "calib_samples": 4,
                                            "calib_seq_len": 64}])), str(tiny_llama), out, isolate=False)
    assert rep["artifact"]["reload_check"]["bitwise_equal"]
    step = rep["slimmed"]["steps"][0]
    assert step["bits"] == 3 and step["bits_per_weight"] == pytest.approx(4.0)  # 3 + 32 bits of scale per 32
    cfg = json.loads((out / "model" / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    p = subprocess.run([sys.executable, "-c", _CT_RELOAD, str(out / "model")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    theirs = torch.tensor(json.loads(p.stdout.strip().splitlines()[-1]))
    ours = load(str(out / "model")).model
    assert any(isinstance(m, WeightOnlyLinear) and m.bits == 3 for m in ours.modules())
    with torch.inference_mode():
        mine = ours(input_ids=torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 2000, 3000]])).logits.float().flatten()
    assert torch.allclose(theirs, mine, atol=1e-5), (theirs - mine).abs().max()


def test_int3_exports_to_gguf_exactly_as_q4_0(tiny_smol, tmp_path, fast_recipe):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from slimctl.workflow import pipeline
    from slimctl import recipe as R
    from slimctl.models import load

    out = tmp_path / "o"
    rep = pipeline.run(R.load(fast_recipe([{"method": "rtn", "bits": 3, "group_size": 32}], export={"format": "gguf"})),
                       str(tiny_smol), out, isolate=False)
    (exp,) = rep["artifact"]["exports"]
    assert exp["exact_layers"] == 14 and not exp["requantized_layers"] and exp["tensor_types"]["Q4_0"] == 14
    assert any("int3 layers are written as Q4_0" in n for n in rep["warnings"])
    down = load(str(out / "model")).model.model.layers[1].mlp.down_proj
    t = {t.name: t for t in gguf.GGUFReader(out / "model.gguf").tensors}["blk.1.ffn_down.weight"]
    ref = down.dequantized(torch.float32).numpy()
    assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape), ref)
