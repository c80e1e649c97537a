"""`slimctl search --engine ray` on a tiny model: the same table as the local engine, a retried
failure, resume after the driver is killed, Ctrl-C (exit 130), and no Ray process left behind."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from slimctl import recipe as R
from slimctl.errors import UsageError
from slimctl.search import SearchOptions, run_search
from slimctl.search.reaper import ENV

EV = R.EvalSpec(max_samples=4, seq_len=64, max_tokens=256)
BE = R.BenchSpec(min_iters=2, min_seconds=0, warmup=1, decode_tokens=2, seq_len=16, batch_size=2, repeats=1)
CANDS = [{"name": "bf16", "steps": [{"method": "bf16"}]},
         {"name": "int4", "steps": [{"method": "rtn", "bits": 4, "group_size": 32}]},
         {"name": "prune90", "steps": [{"method": "magnitude", "sparsity": 0.9}]}]
TIMING = ("objective", "vs_original", "speedup", "speedup_range", "report", "node")


def _search(model, out, engine, **kw):
    opts = SearchOptions(model=str(model), out=out, max_drop=0.005, metric="fidelity", objective="size",
                         candidates=kw.pop("candidates", CANDS), mixed=0, eval=EV, bench=BE, engine=engine, **kw)
    return run_search(opts)


def _ray_left(wait_s: float = 0.0) -> list[str]:
    """Processes that carry the mark of a Ray instance slimctl started (waiting up to `wait_s` for them to go)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and ENV in p.environ():
                    left.append(" ".join(p.cmdline())[:80])
            except psutil.Error:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _rows(res):
    return {r["name"]: {k: v for k, v in r.items() if k not in TIMING} for r in res["candidates"]}


def test_ray_engine_gives_the_local_table(tiny_llama, tmp_path):
    local = _search(tiny_llama, tmp_path / "local", "local")
    ray = _search(tiny_llama, tmp_path / "ray", "ray")
    assert ray["winner"] == local["winner"] == "bf16"
    assert _rows(ray) == _rows(local)  # statuses, drops, pre-filter drops, sizes, budget verdicts: equal, not close
    assert _rows(ray)["int4"]["drop"] > 0 and _rows(ray)["prune90"]["status"] == "dropped"  # not an empty table
    assert ray["engine"]["engine"] == "ray" and ray["engine"]["address"] == "local" and local["engine"]["engine"] == "local"
    done = [r for r in ray["candidates"] if r["status"] == "done"]
    assert len(done) == 2 and all(r["node"]["ray_node_id"] and r["node"]["hostname"] for r in done)
    assert (tmp_path / "ray" / "model" / "slimctl.json").exists()  # the winner's artifact, as with the local engine
    assert _ray_left(wait_s=10) == []


def test_on_an_existing_cluster_a_failing_task_is_retried_once_then_reported(tiny_llama, tmp_path, monkeypatch):
    """`--address`: a cluster started as users start one (`ray start --head`, token authentication, on
    localhost) that slimctl joins and leaves running; one candidate raises once (the retry finishes),
    one kills its worker every time (reported as failed after one retry)."""
    marks = tmp_path / "attempts"
    marks.mkdir()
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "SLIMCTL_SEARCH_FAULT": f"bf16:raise:1:{marks},int4:exit:9:{marks}"}  # the cluster's workers inherit it
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with _cluster() as address:  # the search in its own process, as a user's (Ray keeps a token per process)
        code = (f"import json, sys, test_search_ray as t; json.dump(t._search(sys.argv[1], sys.argv[2], 'ray', "
                f"address=sys.argv[3]), open(sys.argv[2] + '.json', 'w'), default=str)")
        subprocess.run([sys.executable, "-c", code, str(tiny_llama), str(tmp_path / "s"), address], check=True,
                       cwd=Path(__file__).parent, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert _running("gcs_server")  # slimctl joined the cluster and left it running
    res = json.loads((tmp_path / "s.json").read_text())
    rows = {r["name"]: r for r in res["candidates"]}
    assert res["engine"]["address"] == address and res["engine"]["task_cpus"] >= 1
    assert rows["bf16"]["status"] == "done" and res["winner"] == "bf16"  # raised once, the retry finished
    assert sorted(p.name for p in marks.glob("bf16.*")) == ["bf16.1", "bf16.2"]
    assert rows["int4"]["status"] == "failed" and "retried once" in rows["int4"]["error"]  # its worker died twice
    assert sorted(p.name for p in marks.glob("int4.*")) == ["int4.1", "int4.2"]


@contextlib.contextmanager
def _cluster():
    ray_cli = str(Path(sys.executable).parent / "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="slr-", dir="/tmp")  # Ray's socket paths must stay short
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp}"], check=True, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


def _running(name: str) -> bool:
    return any(name in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))


def test_resume_after_kill_and_ctrl_c(tiny_llama, tmp_path):
    """The real CLI: SIGKILL the driver after the first candidate finished (the watchdog ends the Ray
    instance), Ctrl-C during the second (exit 130), then a re-run that runs only the unfinished one."""
    (tmp_path / "a.yaml").write_text("version: 1\nname: a-bf16\nsteps: [{method: bf16}]\n")
    (tmp_path / "b.yaml").write_text("version: 1\nname: b-int8\nsteps: [{method: rtn, bits: 8}]\n")
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "slimctl", "search", str(tiny_llama), "--max-drop", "50%", "--candidates",
           str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"), "--space", "none", "--mixed", "0", "--objective", "size",
           "--metric", "fidelity", "--max-samples", "4", "--engine", "ray", "--out", str(out)]

    first = _Driver(cmd)
    first.wait_for(lambda: list((out / ".cache").glob("*/report.json")), 600)  # the first candidate is cached
    first.proc.kill()
    first.proc.wait()
    assert _ray_left(wait_s=20) == []

    second = _Driver(cmd)
    second.wait_for(lambda: second.said("candidate 2/2: b-int8"), 600)
    second.proc.send_signal(signal.SIGINT)
    assert second.proc.wait(timeout=60) == 130
    second.join()
    assert any(line.startswith("Error: interrupted; the candidates that finished are kept") for line in second.lines)
    assert not second.said("Traceback")
    assert second.said("candidate 1/2: a-bf16 (cached)")
    assert _ray_left(wait_s=20) == []

    third = _Driver(cmd)
    assert third.proc.wait(timeout=900) == 0, third.lines[-5:]
    third.join()
    assert third.said("candidate 1/2: a-bf16 (cached)") and third.said("candidate 2/2: b-int8")
    assert not third.said("candidate 1/2: a-bf16,") and not third.said("a-bf16: done")  # not run again
    assert (out / "search.json").exists() and _ray_left(wait_s=10) == []


def test_a_python_caller_s_own_ray_connection_is_used_and_left_open(tiny_llama, tmp_path, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # ray.init sets it in this process; put back after the test
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    try:
        res = _search(tiny_llama, tmp_path / "s", "ray", candidates=CANDS[:1])
        assert ray.is_initialized() and res["winner"] == "bf16"
        assert res["engine"]["address"] == "the caller's ray.init" and res["candidates"][0]["node"]["ray_node_id"]
    finally:
        ray.shutdown()


def test_without_ray_the_engine_says_how_to_install_it(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UsageError, match=r"--engine ray needs Ray, an optional extra: pip install 'slimctl\[ray\]'"):
        _search(tiny_llama, tmp_path / "s", "ray")
    assert not (tmp_path / "s").exists()  # refused before any work


class _Driver:
    """A CLI process whose stderr lines are collected as they come."""

    def __init__(self, cmd):
        # a job started in the background of a non-interactive shell inherits SIGINT ignored: stand in for
        # a terminal's foreground process, as a user's is (see tests/test_faults.py)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: [self.lines.append(line.strip()) for line in self.proc.stderr])
        self.reader.start()

    def wait_for(self, cond, timeout_s):
        deadline = time.monotonic() + timeout_s
        while not cond():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.join()
                pytest.fail(f"exited or timed out (rc {self.proc.returncode}): {self.lines[-8:]}")
            time.sleep(0.2)

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def join(self):
        self.reader.join(timeout=30)
