"""Full runs of a search as Ray tasks (`slimctl search --engine ray`). Each candidate is one task that
declares a whole node's CPUs (and a GPU on cuda), so a benchmark never shares cores with another
benchmark; a task that raises something unexpected, or whose worker dies, is retried once and then
reported as failed with its error. Without `--address` slimctl starts a local Ray instance (no
dashboard, a small object store, node address 127.0.0.1, Ray's token authentication) and stops it, leftovers included, when the search ends
however it ends; with one it joins that cluster and leaves it running. Ctrl-C cancels what is running."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import DeviceError, SlimctlError, UsageError
from .runners import Finished, Job, Outcome, Started, error_text, run_job

INSTALL = "pip install 'slimctl[ray]' (scripts/setup.sh installs it into .venv)"
OBJECT_STORE_BYTES = 128 * 2**20  # reports are all that travel through it
FAULT_ENV = "SLIMCTL_SEARCH_FAULT"  # test hook, see _inject_fault


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"--engine ray needs Ray, an optional extra: {INSTALL}") from None
    return ray


def _inject_fault(job: Job) -> None:
    """Test hook: SLIMCTL_SEARCH_FAULT="NAME:raise|exit:TIMES:DIR[,...]" makes the first TIMES attempts
    at candidate NAME raise (or kill their worker process), counting attempts by files in DIR."""
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        name, how, times, folder = spec.split(":", 3)
        if name != job.name:
            continue
        attempt = len(list(Path(folder).glob(f"{name}.*"))) + 1
        (Path(folder) / f"{name}.{attempt}").touch()
        if attempt <= int(times):
            if how == "exit":
                os._exit(17)
            raise RuntimeError(f"injected fault, attempt {attempt}")


def _reachable(address: str, timeout_s: float = 10.0) -> None:
    """HOST:PORT answers a TCP connection (Ray itself waits minutes for a GCS that is not there)."""
    import socket

    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UsageError(f"cannot join the Ray cluster at {address}: {e.strerror or e} (is `ray start --head` "
                         "running there, and is the port open?)") from None


def task(job: Job) -> Outcome:
    """What a Ray worker runs: the candidate's full run. slimctl's own errors (the candidate cannot run
    on this model) are results; anything else raises, so Ray retries it."""
    _inject_fault(job)
    return run_job(job, catch=(SlimctlError,))


class RayRunner:
    def __init__(self, address: str | None, device: str, task_cpus: float | None, say: Callable[[str], None]):
        self.address, self.device, self.task_cpus, self.say = address, device, task_cpus, say
        self.marker = self.temp = self.auth_mode = None
        self.connects = False
        self.nodes: list[dict[str, Any]] = []

    def __enter__(self) -> "RayRunner":
        ray = _ray()
        self.auth_mode = os.environ.get("RAY_AUTH_MODE")  # ray.init sets it for this process; put back on exit
        self.connects = not ray.is_initialized()  # False: a Python caller already connected; use that, leave it
        if not self.connects:
            self.address = self.address or "the caller's ray.init"
        elif self.address is None:
            self._start_local(ray)
        else:
            _reachable(self.address)
            try:
                ray.init(address=self.address, log_to_driver=False, logging_level="ERROR")
            except (ConnectionError, RuntimeError, ValueError) as e:
                hint = ("; a cluster with token authentication needs "
                        "RAY_AUTH_MODE=token here, and its token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
                        if "RAY_AUTH_MODE" not in os.environ else "")
                raise UsageError(f"cannot join the Ray cluster at {self.address}: {error_text(e)}{hint}") from None
        try:
            self._resources(ray)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_local(self, ray) -> None:
        from ..machine import physical_cpus
        from .reaper import Marker

        self.marker = Marker()  # set before Ray starts, so every process of the instance carries it
        self.temp = tempfile.mkdtemp(prefix="slimctl-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        cpus = physical_cpus()
        self.say(f"starting a local Ray instance ({cpus} CPUs)")
        try:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                     log_to_driver=False, logging_level="ERROR", _node_ip_address="127.0.0.1", _temp_dir=self.temp)
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _resources(self, ray) -> None:
        """Each task's CPUs (a whole node by default) and GPU; how many tasks run at once."""
        self.nodes = [{"node_id": n["NodeID"], "ip": n.get("NodeManagerAddress"), "cpus": n["Resources"].get("CPU", 0),
                       "gpus": n["Resources"].get("GPU", 0)} for n in ray.nodes() if n.get("Alive")]
        cpus = sorted({n["cpus"] for n in self.nodes if n["cpus"] > 0})
        if not cpus:
            raise UsageError("the Ray cluster has no node with CPUs")
        gpu = self.device.startswith("cuda")
        if gpu and not any(n["gpus"] >= 1 for n in self.nodes):
            raise DeviceError("--device cuda, but no node of the Ray cluster has a GPU")
        self.cpus = self.task_cpus or cpus[0]
        if self.cpus > cpus[-1]:
            raise UsageError(f"--task-cpus {self.cpus:g}: the largest node of the Ray cluster has {cpus[-1]:g} CPUs")
        if self.task_cpus is None and len(cpus) > 1:
            self.say(f"warning: the nodes have {cpus[0]:g} to {cpus[-1]:g} CPUs; each candidate takes {cpus[0]:g}, so a "
                     f"larger node may run several benchmarks at once (--task-cpus {cpus[-1]:g} gives each a whole large node)")
        self.gpus = 1 if gpu else 0
        self.slots = sum(int(n["cpus"] // self.cpus) if not gpu else min(int(n["cpus"] // self.cpus), int(n["gpus"]))
                         for n in self.nodes) or 1

    def __exit__(self, *exc) -> None:
        ray = _ray()
        if self.connects and ray.is_initialized():
            ray.shutdown()
        if self.marker is not None:
            self.marker.close()
            self.marker = None
        if self.temp:
            shutil.rmtree(self.temp, ignore_errors=True)
            self.temp = None
        if self.auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = self.auth_mode

    def describe(self) -> dict[str, Any]:
        return {"engine": "ray", "address": self.address or "local", "task_cpus": self.cpus, "task_gpus": self.gpus,
                "nodes": self.nodes}

    def run(self, jobs: Iterable[Job], started: Started, finished: Finished, stop: Callable[[], bool]) -> None:
        """Keep every slot busy until the jobs run out or `stop()` says so; each outcome as it arrives."""
        ray = _ray()
        remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=1, retry_exceptions=True,
                            max_calls=1)(task)  # max_calls=1: a fresh worker process per candidate
        queue, running = list(jobs), {}
        try:
            while queue or running:
                while queue and len(running) < self.slots and not stop():
                    job = queue.pop(0)
                    running[remote.remote(job)] = job
                    started(job)
                if not running:
                    return
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in ready:
                    job = running.pop(ref)
                    finished(job, self._outcome(ray, ref))
        except KeyboardInterrupt:
            for ref in running:
                ray.cancel(ref, force=True)
            raise

    @staticmethod
    def _outcome(ray, ref) -> Outcome:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # raised twice: the error of the last attempt
            cause = e.cause if isinstance(e.cause, BaseException) else e
            why = f"{error_text(cause)} (failed on both attempts: retried once)"
        except ray.exceptions.RayError as e:  # the worker died (killed, out of memory) twice
            why = f"{type(e).__name__}: the task's worker died on both attempts (retried once)"
        return {"status": "failed", "report": None, "error": why, "node": None}
