"""The local Ray instance slimctl starts dies with the search, however the search ends. Every process
of that instance inherits a marker in its environment; `reap` ends the marked processes, and a small
watchdog process (this module run as a script) reaps them when the driver dies without doing so
itself (killed with SIGKILL, say). Ray's own fate sharing ends the raylet and GCS with the driver but
leaves its agent processes behind; the marker finds those too."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

ENV = "SLIMCTL_RAY_OWNER"


def marked(token: str) -> list:
    """The processes (other than this one) whose environment carries `token`."""
    import psutil

    found = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(ENV) == token:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def reap(token: str, grace_s: float = 3.0) -> int:
    """SIGTERM every marked process, SIGKILL what is left after `grace_s`; returns how many there were."""
    import psutil

    procs = marked(token)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return len(procs)


class Marker:
    """Marks this process's environment (so what it starts inherits the mark) and starts the watchdog;
    `close` reaps, unmarks and stops the watchdog."""

    def __init__(self):
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        env = {k: v for k, v in os.environ.items() if k != ENV}
        self.watchdog = subprocess.Popen([sys.executable, "-m", "slimctl.search.reaper", str(os.getpid()), self.token],
                                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
        os.environ[ENV] = self.token

    def close(self) -> int:
        os.environ.pop(ENV, None)
        n = reap(self.token)
        self.watchdog.terminate()
        try:
            self.watchdog.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.watchdog.kill()
        return n


def _watch(pid: int, token: str) -> None:
    """Wait for the driver `pid` to end, then reap what it left."""
    import psutil

    try:
        born = psutil.Process(pid).create_time()
    except psutil.Error:
        born = None
    while born is not None:
        try:
            p = psutil.Process(pid)
            if p.create_time() != born or p.status() == psutil.STATUS_ZOMBIE:  # reused pid, or dead and unwaited
                break
        except psutil.Error:
            break
        time.sleep(0.5)
    reap(token)


if __name__ == "__main__":
    _watch(int(sys.argv[1]), sys.argv[2])
