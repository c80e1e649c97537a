"""Extending slimctl takes one new file. A toy technique written into slimctl/techniques/ (and removed after)
is picked up, with no other edit, by recipes, `slimctl methods`, `slimctl quantize --help`, search's built-in
space and a full `slimctl quantize` run (docs/development.md, "Adding a technique")."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

TOY = '''"""A toy technique written by tests/test_extension.py and removed after it: rounds Linear weights to a grid."""
from __future__ import annotations

import torch

from .registry import LayerSelection, Proposal, StepContext, register, select_linears


class ToyConfig(LayerSelection):
    step: float = 0.01


@register("toy-ext", "quantize", ToyConfig, "rounds Linear weights to multiples of `step` (a test's toy)",
          proposals=(Proposal("toy-ext-coarse", {"step": 0.05}, order=99),))
def apply(model, cfg: ToyConfig, ctx: StepContext) -> dict:
    layers = select_linears(model, cfg.ignore)
    with torch.no_grad():
        for _, lin in layers:
            lin.weight.copy_(torch.round(lin.weight / cfg.step) * cfg.step)
    return {"layers": len(layers), "changed": [n for n, _ in layers]}
'''

PROBE = """
import json
from slimctl import recipe
from slimctl.search.space import default_space
r = recipe.from_dict({"version": 1, "steps": [{"method": "toy-ext", "step": 0.1}]}, "x")
space = {c["name"]: c["steps"] for c in default_space("causal-lm")}
print(json.dumps({"step": r.steps[0].config.step, "space": space.get("toy-ext-coarse")}))
"""


@pytest.fixture
def toy_technique():
    path = REPO / "slimctl/techniques/_toy_ext_test.py"
    path.write_text(TOY)
    try:
        yield path
    finally:
        path.unlink()


def test_one_new_technique_file_is_picked_up_everywhere(toy_technique, tiny_llama, tmp_path):
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert probe.returncode == 0, probe.stderr
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert got == {"step": 0.1, "space": [{"method": "toy-ext", "step": 0.05}]}

    methods = run_cli("methods", "--json")
    assert methods.returncode == 0, methods.stderr
    toy = [m for m in json.loads(methods.stdout) if m["name"] == "toy-ext"]
    assert toy and toy[0]["kind"] == "quantize", methods.stdout[-500:]

    helped = run_cli("quantize", "--help", env={"COLUMNS": "400"})
    assert helped.returncode == 0 and "toy-ext" in helped.stdout, helped.stdout
    assert "toy-ext" not in run_cli("prune", "--help", env={"COLUMNS": "400"}).stdout

    run = run_cli("quantize", tiny_llama, "--method", "toy-ext", "--set", "step=0.05", "--out", tmp_path / "out",
                  "--skip-bench", "--max-samples", "4", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["slimmed"]["steps"][0]["method"] == "toy-ext" and report["slimmed"]["steps"][0]["layers"] > 0
