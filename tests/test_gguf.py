"""GGUF export and llama.cpp as a runtime: Q4_0/Q8_0 packed bit-exactly from slimctl's codes, llama.cpp's
RoPE row order, the file's keys and types, the tokenizer, and a tiny Llama run in llama.cpp giving
torch's greedy tokens; refusals with one clear error and no partial file."""
import os

import numpy as np
import pytest
import torch

from conftest import run_cli

gguf = pytest.importorskip("gguf")  # a dependency of slimctl itself (transformers' GGUF reader needs it)
from slimctl.formats.gguf import pack_q4_0, pack_q8_0, permute_rows  # noqa: E402

NEEDS_LLAMA_CPP = pytest.mark.skipif(os.environ.get("SLIMCTL_SKIP_LLAMACPP") == "1",
                                     reason="SLIMCTL_SKIP_LLAMACPP=1: setup did not build llama-cpp-python")


def _codes(rows, cols, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (rows, cols), generator=g).numpy()


def _fp16_scales(rows, groups, seed=1):
    """fp16 numbers of both signs: `scale_search: signed` gives a negative scale where a group's extreme is > 0."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (rows, groups), generator=g) * 2 - 1
    return (sign * (torch.rand(rows, groups, generator=g) * 0.05 + 1e-3)).half().float().numpy()


@pytest.mark.parametrize("group, cols", [(32, 96), (64, 192), (128, 384)])
def test_q4_0_and_q8_0_packing_equal_the_dequantized_codes(group, cols):
    for bits, pack, qtype in ((4, pack_q4_0, gguf.GGMLQuantizationType.Q4_0), (8, pack_q8_0, gguf.GGMLQuantizationType.Q8_0)):
        codes = _codes(6, cols, -8 if bits == 4 else -127, 7 if bits == 4 else 127)
        scale = _fp16_scales(6, cols // group)
        ref = codes.astype(np.float32) * np.repeat(scale, group, axis=1)
        got = gguf.quants.dequantize(pack(codes, scale, group), qtype).reshape(ref.shape)
        assert np.array_equal(got, ref), (bits, group)


def test_q4_0_nibble_order_low_is_element_j_high_is_j_plus_16():
    codes = (np.arange(32) % 16 - 8).reshape(1, 32)
    packed = pack_q4_0(codes, np.ones((1, 1), np.float32), 32)
    assert packed.shape == (1, 18) and packed[0, :2].view(np.float16)[0] == 1.0
    q = codes[0] + 8
    assert list(packed[0, 2:]) == [int(q[j] | (q[j + 16] << 4)) for j in range(16)]


def test_rope_permutation_commutes_with_packing():
    codes, scale = _codes(16, 64, -8, 7), _fp16_scales(16, 2)
    a = pack_q4_0(permute_rows(codes, 4), permute_rows(scale, 4), 32)
    b = permute_rows(pack_q4_0(codes, scale, 32), 4)
    assert np.array_equal(a, b)
    w = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)  # rows of head 0: pairs (0, 2), (1, 3) interleave
    assert list(permute_rows(w, 2)[:4, 0]) == [0, 12, 3, 15]


@pytest.fixture(scope="module")
def smol_tiny(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real byte-level BPE tokenizer (49,152 tokens)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from slimctl.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m")[0])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    d = tmp_path_factory.mktemp("smol") / "tiny"
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def exported(smol_tiny, tmp_path_factory):
    """GPTQ int4 g32 with fp16 scales through `slimctl run` with `export: gguf`: the artifact and the GGUF."""
    import yaml

    out = tmp_path_factory.mktemp("run") / "o"
    r = out.parent / "r.yaml"
    r.write_text(yaml.safe_dump({"version": 1, "name": "g32", "export": {"format": "gguf"},
                                 "steps": [{"method": "gptq", "bits": 4, "group_size": 32, "calib_samples": 4, "calib_seq_len": 64}],
                                 "eval": {"max_samples": 2, "seq_len": 64, "max_tokens": 128}, "bench": {"skip": True}}))
    p = run_cli("run", r, "--model", smol_tiny, "--out", out, "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def test_the_export_is_bit_exact_and_the_file_holds_llama_metadata(exported):
    import json

    from slimctl.models import load

    rep = json.loads((exported / "report.json").read_text())
    (exp,) = rep["artifact"]["exports"]
    assert rep["recipe"]["steps"][0]["fp16_scales"] is True  # set by the recipe because an export was asked for
    assert exp["exact_layers"] == 14 and not exp["requantized_layers"] and exp["tensor_types"]["Q4_0"] == 14
    reader = gguf.GGUFReader(exported / "model.gguf")
    val = lambda k: reader.fields[k].contents()
    assert val("general.architecture") == "llama" and val("llama.block_count") == 2 and val("llama.attention.head_count_kv") == 2
    assert val("tokenizer.ggml.model") == "gpt2" and val("tokenizer.ggml.pre") == "gpt-2" and len(val("tokenizer.ggml.tokens")) == 49152
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied head: llama.cpp uses token_embd
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    m = load(str(exported / "model"))
    mods = dict(m.model.named_modules())
    for hf, name, heads in (("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2), ("mlp.down_proj", "ffn_down", None)):
        ref = mods[f"model.layers.1.{hf}"].dequantized(torch.float32).numpy()
        ref = permute_rows(ref, heads) if heads else ref
        t = tensors[f"blk.1.{name}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape), ref), name


@NEEDS_LLAMA_CPP
def test_llama_cpp_runs_the_export_with_torchs_greedy_tokens_and_tokenizer(exported):
    import llama_cpp

    from slimctl.models import load

    m = load(str(exported / "model"))
    text = "The BBC reported that markets rose on Monday, 3 percent in 2024."
    hf_ids = m.tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(exported / "model.gguf"), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf_ids
    ids = hf_ids[:12]
    torch_tokens, cpp_tokens = list(ids), list(ids)
    with torch.inference_mode():
        for _ in range(8):
            logits = m.model(input_ids=torch.tensor([torch_tokens])).logits[0, -1]
            torch_tokens.append(int(logits.argmax()))
    llm.eval(cpp_tokens)
    first = torch.from_numpy(llm.scores[len(ids) - 1].copy())
    for _ in range(8):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        cpp_tokens.append(nxt)
        llm.eval([nxt])
    assert cpp_tokens == torch_tokens
    with torch.inference_mode():
        ref = m.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    assert torch.allclose(first, ref, atol=0.05 * ref.abs().max().item()), (first - ref).abs().max()


@NEEDS_LLAMA_CPP
def test_eval_and_bench_run_a_gguf_through_llama_cpp_on_the_same_windows(exported, smol_tiny):
    import json

    p = run_cli("eval", exported / "model.gguf", "--against", exported / "model", "--max-samples", "2", "--seq-len", "64",
                "--max-tokens", "128", "--kernels", "off", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    from slimctl.evaluate.evaluation import _windows

    assert r["settings"]["tokens_scored"] == 127 and r["settings"]["windows"] == len(list(_windows(128, 64, 64)))
    # the same int4 weights through llama.cpp's Q4_0 kernels (q8_0 activations) and torch's dequantize path
    assert abs(r["vs_reference"]["perplexity_ratio"] - 1) < 0.02 and r["vs_reference"]["kl_divergence"] < 0.01
    b = run_cli("bench", exported / "model.gguf", "--runtime", "llamacpp", "--repeats", "1", "--min-iters", "2", "--min-seconds", "0",
                "--seq-len", "16", "--decode-tokens", "4", "--json")
    assert b.returncode == 0, b.stderr[-2000:]
    bench = json.loads(b.stdout)["bench"]
    assert bench["backend"] == "llama.cpp" and bench["decode_tokens_per_s"] > 0 and bench["prefill_ms"]["p50"] > 0
    assert bench["size_mb"] == pytest.approx((exported / "model.gguf").stat().st_size / 2**20)


def test_exports_that_cannot_be_exact_are_refused_without_a_partial_file(smol_tiny, tiny_bert, tmp_path):
    q = run_cli("quantize", smol_tiny, "--method", "rtn", "--bits", "4", "--group-size", "32", "--asymmetric",
                "--skip-eval", "--skip-bench", "--out", tmp_path / "asym")
    assert q.returncode == 0, q.stderr[-1500:]
    for args, msg in (((tmp_path / "asym" / "model",), "cannot be written exactly as Q4_0: asymmetric zero points"),
                      ((tiny_bert,), "GGUF export is not available for family 'bert' yet"),
                      ((smol_tiny, "--embeddings", "q3"), "--embeddings: Input should be 'q8_0', 'f16' or 'f32'")):
        p = run_cli("export", *args, "--out", tmp_path / "x.gguf")
        errors = [l for l in p.stderr.splitlines() if l.startswith("Error:")]
        assert p.returncode == 2 and len(errors) == 1 and msg in errors[0], p.stderr[-1500:]
        assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".x.gguf*"))
    ok = run_cli("export", tmp_path / "asym" / "model", "--requantize", "--out", tmp_path / "x.gguf", "--json")
    assert ok.returncode == 0 and "quantized again" in ok.stderr and (tmp_path / "x.gguf").exists()


def _gguf_families() -> list[str]:
    from slimctl import families

    return sorted(f.name for f in families.load_all().values() if f.gguf_arch)


def _gptq_g32_artifact(src, out):
    """What `slimctl quantize SRC --method gptq --bits 4 --group-size 32 --set fp16_scales=true --set calib_samples=4
    --set calib_seq_len=64 --out OUT --skip-eval --skip-bench` writes, run in this process (the CLI's own path is
    the `exported` fixture's; a subprocess per family cost ~6 s of imports each); the artifact, loaded."""
    from slimctl import recipe as R
    from slimctl.models import load
    from slimctl.workflow.family_matrix import slim_and_save

    step = dict(method="gptq", bits=4, group_size=32, fp16_scales=True, calib_samples=4, calib_seq_len=64)
    recipe = R.from_dict({"version": 1, "name": "gguf-family", "steps": [step]}, "test")
    slim_and_save(load(str(src)), recipe, out, str(src))
    return load(str(out))


def _tiny_src(family, path, **overrides):
    """`family`'s tiny random model on SmolLM2's tokenizer, saved to `path` with it."""
    import transformers

    from slimctl.families import tiny
    from slimctl.models import resolve

    tok = transformers.AutoTokenizer.from_pretrained(resolve("smollm2-135m")[0])
    tiny.build(family, tok, **overrides).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _assert_llama_cpp_gives_torchs_logits(path, m):
    """llama.cpp's next-token logits of the GGUF at `path` after 12 tokens of BBC-style text: torch's argmax (`m`, the
    artifact it was written from), within 5 % of the largest logit (the Llama export's tolerance)."""
    import llama_cpp

    ids = m.tokenizer("The BBC reported that markets rose on Monday, 3 percent in 2024.", add_special_tokens=False)["input_ids"][:12]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[len(ids) - 1]))
    with torch.inference_mode():
        ref = m.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    assert int(got.argmax()) == int(ref.argmax())
    assert torch.allclose(got, ref, atol=0.05 * ref.abs().max().item()), (got - ref).abs().max()


@NEEDS_LLAMA_CPP
@pytest.mark.parametrize("family", _gguf_families())
def test_every_exporting_family_runs_in_llama_cpp_with_torchs_logits(family, tmp_path):
    """Each family whose file names a llama.cpp architecture: its tiny model (SmolLM2's BPE tokenizer) through
    GPTQ g32 and GGUF; llama.cpp's next-token logits equal torch's argmax and lie within 5 % of the largest logit
    (the Llama export's tolerance). Covers RoPE row order (llama/granite permuted, NEOX not), biases (Qwen2,
    Phi-2, GPT-2), Gemma's 1 + w norms, fused qkv/gate_up (Phi-3), Conv1D turned Linear (GPT-2), experts stacked
    per layer (Mixtral as llama, Qwen2-MoE with its shared expert, Qwen3-MoE)."""
    from slimctl import families
    from slimctl.formats.gguf import export as write_gguf

    m = _gptq_g32_artifact(_tiny_src(family, tmp_path / "src"), tmp_path / "q" / "model")
    write_gguf(m, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.architecture"].contents() == families.REGISTRY[family].gguf_arch
    names = {t.name for t in reader.tensors}
    assert ("blk.0.attn_q.bias" in names) == (family in ("qwen2", "phi", "qwen2_moe"))  # separate q/k/v with biases
    assert ("blk.0.attn_q_norm.weight" in names) == (family in ("qwen3", "gemma3", "qwen3_moe"))
    if families.REGISTRY[family].experts:  # one Linear per expert in slimctl, stacked [experts, rows, cols] here
        t = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate_exps.weight")
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0 and int(t.shape[-1]) == 4
    _assert_llama_cpp_gives_torchs_logits(tmp_path / "m.gguf", m)


def test_gguf_refuses_families_it_does_not_export_by_name():
    from slimctl.errors import UnsupportedError
    from slimctl.formats.gguf import check_architecture

    from transformers import OPTConfig

    with pytest.raises(UnsupportedError, match="not available for family 'opt' yet; it supports the families gemma, "):
        check_architecture(OPTConfig())


@pytest.fixture(scope="module")
def gemma_tokenizer():
    """Gemma 3's real SentencePiece-style tokenizer (262,144 tokens, byte fallback, no space prefix, BOS on
    every input), read once from the built-in's GGUF and cached without converting its weights."""
    import shutil
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    from slimctl.models import BUILTINS, cache_dir, gguf_source, package_dir

    b = BUILTINS["gemma3-270m"]
    converted = cache_dir() / "models" / b.name
    if (converted / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(converted)
    folder = cache_dir() / "tokenizers" / b.name
    if not (folder / "tokenizer.json").exists():
        pkg = package_dir(b.package)
        if pkg is None:
            pytest.skip(f"{b.pip} is not installed (run scripts/setup.sh)")
        tmp = Path(tempfile.mkdtemp())
        try:
            AutoTokenizer.from_pretrained(gguf_source(b, pkg, tmp), gguf_file=b.gguf).save_pretrained(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(folder)


@NEEDS_LLAMA_CPP
def test_a_sentencepiece_style_tokenizer_tokenizes_in_llama_cpp_as_in_hf(gemma_tokenizer, tmp_path):
    """The "llama" (SPM) tokenizer path: scores from BPE merge ranks, no space prefix where the tokenizer adds
    none, BOS as the tokenizer adds it, added tokens ('<b>') matched in raw text. Before: every BBC article
    split differently from its first word."""
    import llama_cpp

    from slimctl.evaluate import data
    from slimctl.families import tiny

    tok = gemma_tokenizer
    tiny.build("gemma3", tok).save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    p = run_cli("export", tmp_path / "src", "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert p.returncode == 0, p.stderr[-1500:]
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    texts = [e.text for e in data.bbc("eval")[:40]] + [
        "Hello  world!\n\n  tabs\there   ünïcödé 日本語 🤖 1234567 x=y+z; <b>html</b>", " leading space", "don't", "a\n\n\nb"]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text[:60]


def _write_recipe(path, steps):
    import yaml

    path.write_text(yaml.safe_dump({"version": 1, "name": "g", "export": {"format": "gguf"}, "steps": steps,
                                    "eval": {"max_samples": 2, "seq_len": 32, "max_tokens": 64}, "bench": {"skip": True}}))
    return path


GLOBAL_FFN = {"method": "structured", "ffn": 0.35, "allocation": "global", "multiple_of": 32, "calib_samples": 4, "calib_seq_len": 32}


def test_per_layer_ffn_widths_outside_the_llama_layout_are_refused_before_any_file_or_run(tmp_path):
    """llama.cpp's architectures other than 'deci' build every layer with one FFN width (tested: a Qwen-style file with
    per-layer widths fails its shape check), so a non-Llama model with slimctl_layer_sizes, and a recipe whose
    structured step would make one, are refused with one Error: line before anything is written or run."""
    from slimctl.errors import UnsupportedError
    from slimctl.formats.gguf import check_architecture

    from transformers import Qwen2Config

    config = Qwen2Config(num_hidden_layers=2)
    config.slimctl_layer_sizes = {"intermediate_size": [96, 64]}
    with pytest.raises(UnsupportedError, match="per-layer FFN widths .*'qwen2' architecture builds every layer with one"):
        check_architecture(config)
    src = _tiny_src("qwen2", tmp_path / "src")
    p = run_cli("run", _write_recipe(tmp_path / "r.yaml", [GLOBAL_FFN]), "--model", src, "--out", tmp_path / "o")
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error:")]
    assert p.returncode == 2 and len(errors) == 1 and "allocation global" in errors[0], p.stderr[-1500:]
    assert not (tmp_path / "o" / "model.gguf").exists() and not (tmp_path / "o" / "report.json").exists()


@NEEDS_LLAMA_CPP
def test_per_layer_ffn_widths_of_a_llama_export_as_deci_and_run_in_llama_cpp(tmp_path):
    """A Llama pruned with one model-wide budget (per-layer FFN widths) then GPTQ g32, through `slimctl run` with
    `export: gguf`: written as llama.cpp's 'deci' architecture with an n_ff array equal to the artifact's widths;
    llama.cpp's next-token logits give torch's argmax within 5 % of the largest logit; slimctl reads the file back
    (a LlamaConfig with the widths, the same tokens)."""
    import json

    from slimctl.formats.llamacpp import load_gguf
    from slimctl.models import load

    src = _tiny_src("llama", tmp_path / "src", num_hidden_layers=4)
    gptq = {"method": "gptq", "bits": 4, "group_size": 32, "calib_samples": 4, "calib_seq_len": 32}
    out = tmp_path / "o"
    p = run_cli("run", _write_recipe(tmp_path / "r.yaml", [GLOBAL_FFN, gptq]), "--model", src, "--out", out, "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    (exp,) = json.loads((out / "report.json").read_text())["artifact"]["exports"]
    m = load(str(out / "model"))
    widths = m.model.config.slimctl_layer_sizes["intermediate_size"]
    assert len(set(widths)) > 1 and exp["exact_layers"] == 28 and not exp["requantized_layers"]
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.feed_forward_length"].contents() == widths
    _assert_llama_cpp_gives_torchs_logits(out / "model.gguf", m)
    back, tok = load_gguf(out / "model.gguf")
    assert back.config.slimctl_layer_sizes == {"intermediate_size": widths} and back.config.num_hidden_layers == 4
    text = "Markets rose 3 percent on Monday."
    assert tok(text, add_special_tokens=False)["input_ids"] == m.tokenizer(text, add_special_tokens=False)["input_ids"]
