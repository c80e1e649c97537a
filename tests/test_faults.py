"""Interruptions: SIGKILL while saving leaves nothing or the previous artifact; Ctrl-C exits 130."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, tree_digest

_SLOW_SAVE = """
import sys, time, slimctl.models as M
from slimctl.cli import main
real = M.file_digest
def slow(path):  # hold the save open so the test can interrupt it mid-way
    print("SAVING", flush=True); time.sleep(30); return real(path)
M.file_digest = slow
sys.argv = ["slimctl"] + sys.argv[1:]
main()
"""


def _start(args):
    return subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _wait_for_save(p):
    deadline = time.time() + 120
    for line in p.stdout:
        if "SAVING" in line or time.time() > deadline:
            return
    pytest.fail("the run never reached the save")


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-previous"])
def test_sigkill_while_saving_leaves_nothing_or_the_previous_artifact(previous, tiny_llama, tmp_path, fast_recipe):
    recipe = fast_recipe([{"method": "bf16"}])
    out = tmp_path / "o"
    before = None
    if previous:
        assert subprocess.run([sys.executable, "-m", "slimctl", "run", recipe, "--model", tiny_llama, "--out", out, "--inline"],
                              cwd=REPO, capture_output=True).returncode == 0
        before = tree_digest(out / "model")
    p = _start(["run", recipe, "--model", tiny_llama, "--out", out, "--inline", "--skip-bench", "--overwrite"]
               if previous else ["run", recipe, "--model", tiny_llama, "--out", out, "--inline"])
    _wait_for_save(p)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    if previous:
        assert tree_digest(out / "model") == before
    else:
        assert not (out / "model").exists()
    # the next run cleans the temporary sibling the killed one left, and succeeds
    r = subprocess.run([sys.executable, "-m", "slimctl", "run", recipe, "--model", tiny_llama, "--out", out, "--inline",
                        "--overwrite"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not [x for x in os.listdir(out) if x.startswith(".model.")]


def test_ctrl_c_exits_130_without_a_partial_artifact(tiny_llama, tmp_path, fast_recipe):
    out = tmp_path / "o"
    p = _start(["run", fast_recipe([{"method": "bf16"}]), "--model", tiny_llama, "--out", out, "--inline"])
    _wait_for_save(p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert err.strip().splitlines()[-1].startswith("Error: interrupted")
    assert not (out / "model").exists() and not [x for x in os.listdir(out) if x.startswith(".model.")]
