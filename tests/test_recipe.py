"""The typed recipe: shipped recipes parse, mistakes are RecipeErrors naming the key and file."""
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from slimctl import recipe as R
from slimctl.errors import RecipeError

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_there_are_shipped_recipes():
    names = {p.stem for p in RECIPES}
    assert {"bf16", "int8-dynamic", "int8-weight-only", "prune-magnitude-50"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_parses(path):
    r = R.load(path)
    assert r.version == 1 and r.steps


def _write(tmp_path, doc) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


BASE = {"version": 1, "steps": [{"method": "int8-dynamic"}]}


@pytest.mark.parametrize("doc, expected", [
    ({**BASE, "stepz": []}, "unknown key 'stepz' in the top level"),
    ({**BASE, "eval": {"max_sample": 3}}, "unknown key 'max_sample' in eval"),
    ({**BASE, "gates": {"min_speed": 1}}, "unknown key 'min_speed' in gates"),
    ({"version": 1, "steps": [{"method": "magnitude", "sparsity": 0.5, "sparsty": 1}]}, "unknown key 'sparsty' in steps[0]"),
    ({"version": 1, "steps": [{"method": "magnitude", "sparsity": 1.5}]}, "steps[0].sparsity: Input should be less than 1"),
    ({"version": 1, "steps": [{"method": "magnitude"}]}, "steps[0]: give either sparsity"),
    ({"version": 1, "steps": [{"method": "gptq-9000"}]}, "unknown method 'gptq-9000'"),
    ({"version": 2, "steps": [{"method": "bf16"}]}, "version: Input should be 1"),
    ({"version": 1, "steps": []}, "steps: List should have at least 1 item"),
    ({"version": 1, "steps": [{"sparsity": 0.5}]}, "each step needs 'method'"),
    ({"version": 1, "steps": [{"method": "int8-dynamic"}, {"method": "magnitude", "sparsity": 0.5}]},
     "'magnitude' comes after quantization"),
    ({"version": 1, "steps": [{"method": "int8-dynamic"}, {"method": "rtn"}]}, "at most one quantization step"),
    ({**BASE, "bench": {"batch_size": 0}}, "bench.batch_size: Input should be greater than or equal to 1"),
    ({**BASE, "bench": {"device": "tpu"}}, "bench.device: Input should be 'cpu' or 'cuda'"),
    ([1, 2], "a recipe must be a YAML mapping"),
])
def test_bad_recipe_is_a_recipe_error_naming_the_problem(tmp_path, doc, expected):
    p = _write(tmp_path, doc)
    with pytest.raises(RecipeError) as e:
        R.load(p)
    assert expected in str(e.value)
    assert str(p) in str(e.value)


def test_malformed_yaml_names_the_line(tmp_path):
    p = _write(tmp_path, "version: 1\nsteps: [\n  - method: bf16\n")
    with pytest.raises(RecipeError, match=r"not valid YAML at line \d+"):
        R.load(p)


def test_missing_and_folder_recipe(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        R.load(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="is a folder"):
        R.load(tmp_path)


def test_roundtrip_to_dict_parses_again():
    r = R.load(Path(__file__).parents[1] / "recipes" / "prune-magnitude-50.yaml")
    again = R.from_dict(r.to_dict())
    assert again.to_dict() == r.to_dict()


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(-2, 2), st.just(float("nan")), st.text(max_size=12))
_keys = st.sampled_from(["version", "steps", "eval", "bench", "gates", "method", "sparsity", "scope", "ignore",
                         "max_samples", "batch_size", "device", "min_speedup", "seed", "name", "bogus"])
_docs = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(_keys, kids, max_size=6)),
                     max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.one_of(_docs, st.fixed_dictionaries({"version": st.just(1), "steps": st.lists(
    st.dictionaries(_keys, _scalars, max_size=4).map(lambda d: {"method": "magnitude", **d}), max_size=3)})))
def test_fuzzed_recipes_give_a_recipe_or_a_recipe_error(doc):
    try:
        r = R.from_dict(doc, "fuzz")
    except RecipeError:
        return
    assert isinstance(r, R.Recipe)
