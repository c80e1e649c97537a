"""Faults: SIGKILL and Ctrl-C mid-save, disk full, memory caps, pickle policy, and byte-identical reruns."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, scaled, tree_digest

_SLOW_SAVE = """
import os, signal, sys, time, slimctl.models as M
# A job started in the background of a non-interactive shell inherits SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler: stand in for a terminal's foreground process, as a user's is.
signal.signal(signal.SIGINT, signal.default_int_handler)
from slimctl.cli import main
real = M.file_digest
def slow(path):  # hold the save open so the test can interrupt it mid-way
    print("SAVING", flush=True)
    if os.environ.get("SLIMCTL_TEST_HOLD") == "until-signal":  # the run cannot pass this point before a signal
        deadline = time.time() + float(os.environ["SLIMCTL_TEST_HOLD_S"])
        while time.time() < deadline:
            time.sleep(0.05)
    else:
        time.sleep(30)
    return real(path)
M.file_digest = slow
sys.argv = ["slimctl"] + sys.argv[1:]
main()
"""


def _start(args, hold=False):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if hold:
        env.update(SLIMCTL_TEST_HOLD="until-signal", SLIMCTL_TEST_HOLD_S=str(scaled(300)))
    return subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_save(p):
    deadline = time.time() + scaled(120)
    for line in p.stdout:
        if "SAVING" in line:
            return
        if time.time() > deadline:
            pytest.fail("the run did not reach the save in time")
    pytest.fail(f"the run ended (exit {p.wait()}) without reaching the save")


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
    p.wait(timeout=scaled(30))
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
    # The save holds until the signal arrives (however loaded the machine), so the only right outcome
    # is exit 130 with no artifact; a whole artifact with exit 0 would mean the signal was lost.
    p = _start(["run", fast_recipe([{"method": "bf16"}]), "--model", tiny_llama, "--out", out, "--inline"], hold=True)
    _wait_for_save(p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=scaled(240))  # generous: a loaded 2-core machine starves the exiting process
    assert p.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("Error: interrupted")
    assert not (out / "model").exists()
    assert not out.exists() or not [x for x in os.listdir(out) if x.startswith(".model.")]


STEPS = {
    "bf16": [{"method": "bf16"}],
    "magnitude": [{"method": "magnitude", "sparsity": 0.5}],
    "rtn-int4": [{"method": "rtn", "bits": 4, "group_size": 32}],
    "gptq-int4": [{"method": "gptq", "bits": 4, "group_size": 32, "calib_samples": 4, "calib_seq_len": 32, "act_order": True}],
    "smoothquant": [{"method": "smoothquant", "calib_samples": 4, "calib_seq_len": 32}],
    "int8-dynamic": [{"method": "int8-dynamic"}],
}


@pytest.mark.parametrize("name", STEPS)
def test_same_recipe_model_and_seed_give_a_byte_identical_artifact(name, tiny_llama, tmp_path, fast_recipe):
    r = fast_recipe(STEPS[name])
    digests = []
    for i in range(2):
        p = subprocess.run([sys.executable, "-m", "slimctl", "run", r, "--model", tiny_llama, "--out", tmp_path / f"o{i}",
                            "--inline", "--skip-bench", "--skip-eval"], cwd=REPO, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        digests.append(tree_digest(tmp_path / f"o{i}" / "model"))
    assert digests[0] == digests[1]


_LIMITED = """
import resource, sys
soft = int(sys.argv[1]); kind = getattr(resource, sys.argv[2])
resource.setrlimit(kind, (soft, resource.getrlimit(kind)[1]))
from slimctl.cli import main
sys.argv = ["slimctl"] + sys.argv[3:]
main()
"""


def test_disk_full_while_saving_is_a_clean_error_with_no_artifact(tiny_llama, tmp_path, fast_recipe):
    out = tmp_path / "o"
    p = subprocess.run([sys.executable, "-c", _LIMITED, str(64 * 1024), "RLIMIT_FSIZE", "run", fast_recipe([{"method": "bf16"}]),
                        "--model", tiny_llama, "--out", out, "--inline", "--skip-bench", "--skip-eval"],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr[-1500:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: could not write the artifact") and "nothing was left there" in last
    assert "Traceback" not in p.stderr
    assert not (out / "model").exists()
    assert not out.exists() or not [x for x in os.listdir(out) if x.startswith(".model.")]


def test_allow_pickle_loads_pickle_weights_with_a_warning(tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pkl"
    import shutil

    shutil.copytree(tiny_llama, d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    p = subprocess.run([sys.executable, "-m", "slimctl", "eval", d, "--max-samples", "2", "--seq-len", "32", "--allow-pickle", "--json"],
                       cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-1500:]
    assert "warning: loading pickle weights" in p.stderr and json.loads(p.stdout)["metrics"]["perplexity"] > 1


def test_memory_cap_during_bench_is_a_clear_error(tiny_llama):
    # batch 4096 x 512 tokens: the attention scores alone would need ~17 GB
    p = subprocess.run([sys.executable, "-c", _LIMITED, str(3 * 2**30), "RLIMIT_AS", "bench", tiny_llama, "--batch-size", "4096",
                        "--seq-len", "500", "--decode-tokens", "1", "--min-iters", "1", "--min-seconds", "0"],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr[-1500:]
    assert p.stderr.strip().splitlines()[-1].startswith("Error: out of memory; try a smaller")
