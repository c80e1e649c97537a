"""rotate: Hadamard constructions, the folded rotation keeps every RMSNorm family's logits, refusals by name,
a broken fold is caught and undone, and rotate + GPTQ reloads in plain transformers and exports exactly to GGUF."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import _tokenizer, run_cli

from slimctl.errors import UnsupportedError
from slimctl.quant.hadamard import block_size, hadamard, rotation


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 576, 768, 896, 960, 2304])
def test_hadamard_orders_models_use_are_built(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_an_order_without_a_known_matrix_gets_block_diagonal_blocks():
    n = 8 * 23  # 184: 23 is odd, and no Paley prime gives 46 (45), 92 (91 = 7 x 13, 45) or 184 (183, 91)
    assert hadamard(n) is None and block_size(n) == 8
    q, what = rotation(n, "hadamard", 0)
    assert what == "randomised block-diagonal Hadamard (23 blocks of 8)"
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_rotations_are_seeded_and_orthogonal():
    a, _ = rotation(576, "hadamard", 3)
    b, _ = rotation(576, "hadamard", 3)
    c, _ = rotation(576, "hadamard", 4)
    r, _ = rotation(64, "random", 0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a @ a.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(r @ r.T, torch.eye(64, dtype=torch.float64), atol=1e-12)


def _ctx(tok):
    from slimctl.techniques import StepContext

    return StepContext(kind="causal-lm", tokenizer=tok)


def _build(family, tok, **overrides):
    from slimctl.families import convert, tiny

    model = tiny.build(family, tok)
    convert.prepare(model)
    return model


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


IDS = torch.tensor([[101, 2023, 2003, 1037, 3231, 1997, 1996, 12731, 2291, 102, 2000, 3000]])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "granite", "mixtral", "qwen2_moe"])
def test_rotation_keeps_the_logits_and_moves_every_weight(family):
    from slimctl.techniques import get

    tok = _tokenizer()
    model = _build(family, tok)
    before = _logits(model, IDS)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    stats = get("rotate").apply(model, get("rotate").config(), _ctx(tok))
    after = _logits(model, IDS)
    assert before.std() > 0.05  # logits that vary: equality below is a real check
    assert torch.allclose(after, before, atol=2e-5), (after - before).abs().max()
    changed = [k for k, v in model.state_dict().items() if k in old and v.dim() == 2 and not torch.equal(v, old[k])]
    two_d = [k for k, v in old.items() if v.dim() == 2]
    assert set(two_d) - set(changed) <= {"model.rotary_emb.inv_freq"}, set(two_d) - set(changed)
    norms = [m.weight for n, m in model.named_modules() if "RMSNorm" in type(m).__name__ and not n.endswith(("q_norm", "k_norm"))]
    offset = 1.0 if family == "gemma" else 0.0
    assert norms and all(torch.all(w + offset == 1) for w in norms)  # scales moved into the Linears
    assert stats["head_rotation"] == "randomised Hadamard 16x16"


def test_without_grouped_query_attention_and_with_a_bias_the_fold_is_exact():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slimctl.techniques import get

    tok = _tokenizer()
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)  # q/k/v biases: v's is rotated per head
    before = _logits(model, IDS)
    stats = get("rotate").apply(model, get("rotate").config(), _ctx(tok))
    assert stats["rotation"] == "randomised Hadamard 48x48" and stats["tied_head"]  # norms at 1: the head stays tied
    assert torch.allclose(_logits(model, IDS), before, atol=2e-5)


@pytest.mark.parametrize("family,words", [("gemma2", "post-norms"), ("phi", "LayerNorm"), ("gpt2", "LayerNorm"),
                                          ("opt", "LayerNorm")])
def test_families_a_rotation_does_not_fold_through_are_refused_by_name(family, words):
    from slimctl.techniques import get

    tok = _tokenizer()
    model = _build(family, tok)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedError, match=words):
        get("rotate").apply(model, get("rotate").config(), _ctx(tok))
    assert all(torch.equal(v, old[k]) for k, v in model.state_dict().items())


def test_a_fold_that_breaks_the_function_is_caught_and_undone(monkeypatch):
    from slimctl.techniques import get, rotate

    tok = _tokenizer()
    model = _build("llama", tok)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(rotate, "_write", lambda lin, q, rows=None: None)  # writers left unrotated: wrong
    with pytest.raises(UnsupportedError, match="changed its output"):
        get("rotate").apply(model, get("rotate").config(), _ctx(tok))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # re-tied
    assert model.config.tie_word_embeddings
    assert all(torch.equal(v, old[k]) for k, v in model.state_dict().items())


def test_rotate_must_come_before_quantization():
    from slimctl import recipe as R
    from slimctl.errors import RecipeError

    with pytest.raises((RecipeError, ValueError), match="rotate"):
        R.Recipe.model_validate({"version": 1, "name": "x", "steps": [{"method": "gptq"}, {"method": "rotate"}]})


@pytest.fixture(scope="module")
def rotated_gguf(tiny_smol, tmp_path_factory):
    """rotate + GPTQ int4 g32 (fp16 scales) with `export: gguf` through `slimctl run`, on a tiny Llama with
    SmolLM2's tokenizer (a tied head whose final norm is not 1: rotate unties it)."""
    import yaml

    base = tmp_path_factory.mktemp("rot")
    r = base / "r.yaml"
    r.write_text(yaml.safe_dump({"version": 1, "name": "rot", "export": {"format": "gguf"},
                                 "steps": [{"method": "rotate"},
                                           {"method": "gptq", "bits": 4, "group_size": 32, "calib_samples": 4, "calib_seq_len": 64}],
                                 "eval": {"max_samples": 2, "seq_len": 64, "max_tokens": 128}, "bench": {"skip": True}}))
    p = run_cli("run", r, "--model", tiny_smol, "--out", base / "o", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    return base / "o"


def test_rotated_gptq_exports_every_layer_exactly_with_an_untied_head(rotated_gguf):
    gguf = pytest.importorskip("gguf")
    rep = json.loads((rotated_gguf / "report.json").read_text())
    steps = rep["slimmed"]["steps"]
    assert steps[0]["method"] == "rotate" and steps[0]["max_logprob_change"] < 1e-3
    assert any("untied the LM head" in n for n in rep["warnings"])
    (exp,) = rep["artifact"]["exports"]
    assert exp["exact_layers"] == 14 and not exp["requantized_layers"]
    names = {t.name for t in gguf.GGUFReader(rotated_gguf / "model.gguf").tensors}
    assert "output.weight" in names


def test_rotated_gptq_reloads_in_plain_transformers_with_slimctls_logits(rotated_gguf):
    pytest.importorskip("compressed_tensors")
    import subprocess
    import sys

    from slimctl.models import load

    from test_quant import _CT_RELOAD

    folder = rotated_gguf / "model"
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    p = subprocess.run([sys.executable, "-c", _CT_RELOAD, str(folder)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    theirs = torch.tensor(json.loads(p.stdout.strip().splitlines()[-1]))
    with torch.inference_mode():
        mine = load(str(folder)).model(input_ids=torch.tensor([[101, 2023, 2003, 1037, 3231, 102, 2000, 3000]])).logits.float().flatten()
    assert torch.allclose(theirs, mine, atol=1e-5)
