"""One trainer per workdir: a lock file naming its holder, refreshed while it runs.

Two trainers writing one workdir would interleave checkpoints and metrics and
corrupt each other's resume. The first takes `<workdir>/trainer.lock`
(atomically: created only if absent) with its host, pid and start time, and a
background thread touches it every `HEARTBEAT_SECONDS`. A second trainer is
refused with a message naming the holder, unless the lock is stale: its
process is gone (same host), or it has not been touched for `STALE_SECONDS`
(another host, which cannot be asked). On several hosts only process 0 locks;
the others belong to the same run. Cloud workdirs (gs://) get no lock: object
stores have no atomic create here, and `launch/` refuses a second run per pod.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from absl import logging

from flamingo_jax.errors import UserError

LOCK_NAME = "trainer.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


class WorkdirBusy(UserError, RuntimeError):
    """The workdir is in use by another trainer."""


class NotAWorkdir(UserError, NotADirectoryError):
    """A --workdir that names a file."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _holder(self) -> dict | None:
        """The current holder's record, or None when the lock is free or stale."""
        try:
            with open(self.path) as f:
                holder = json.load(f)
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # half-written by a holder that died while creating it
            return None
        if holder.get("host") == self.record["host"]:
            return holder if _alive(int(holder.get("pid", -1))) else None
        return holder if age < STALE_SECONDS else None

    def acquire(self) -> "WorkdirLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                    raise WorkdirBusy(
                        f"workdir {os.path.dirname(self.path)} is in use by the trainer pid {holder.get('pid')} on "
                        f"host {holder.get('host')} (since {since}); wait for it to finish or stop it (SIGTERM "
                        f"saves a checkpoint), or, if that process is gone, delete {self.path}.") from None
                logging.warning("taking over the stale lock %s", self.path)
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
            self.held = True
            self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
            self._thread.start()
            return self
        raise WorkdirBusy(f"could not take the lock {self.path}: another trainer took it at the same time.")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            with open(self.path) as f:
                if json.load(f).get("pid") == os.getpid():
                    os.remove(self.path)
        except (OSError, ValueError):
            pass
        self.held = False
