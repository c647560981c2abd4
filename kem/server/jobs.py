"""Consolidation dry runs started from the console (``/console/versions``): ``kem consolidate --dry-run``
in its own process (the server keeps serving; the job takes the store's job lock like any other), its
output (progress bars, then its report) kept under ``KEM_HOME/console-jobs/<id>.log`` so it can be
watched, and its exit code read when it ends. A dry run publishes and retires nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kem.errors import NotFoundError, ValidationError
from kem.server.auth import Principal

if TYPE_CHECKING:
    from kem.settings import Settings

MAX_RUNNING = 1  # dry runs at a time (each loads a model and computes a delta)
TAIL_LINES = 60


@dataclass
class Job:
    id: str
    method: str
    namespace: str | None
    owner: str  # the namespace of the key that started it (tenants see only their own)
    started: float
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    returncode: int | None = None
    ended: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def running(self) -> bool:
        if self.proc is not None and self.returncode is None:
            rc = self.proc.poll()
            if rc is not None:
                self.returncode, self.ended = rc, time.time()
        return self.returncode is None

    @property
    def state(self) -> str:
        if self.running:
            return "running"
        return {0: "done", 1: "refused by its gates"}.get(self.returncode or 0, f"failed (exit {self.returncode})")

    def tail(self, n: int = TAIL_LINES) -> str:
        """The last ``n`` lines of the output, progress bars' carriage returns folded to their latest state."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        lines = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
        return "\n".join(line for line in lines[-n:])


class ConsoleJobs:
    """The dry runs this server started (kept in memory: a restart forgets them, their logs stay)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, caller: Principal, method: str, namespace: str | None) -> Job:
        with self._lock:
            if sum(j.running for j in self._jobs.values()) >= MAX_RUNNING:
                raise ValidationError("a dry run is already running; wait for it to end", field="method")
            folder = Path(self.settings.home) / "console-jobs"
            folder.mkdir(parents=True, exist_ok=True)
            job_id = uuid.uuid4().hex[:12]
            job = Job(job_id, method, namespace, caller.namespace if not caller.admin else "", time.time(),
                      folder / f"{job_id}.log")
            args = [sys.executable, "-m", "kem", "consolidate", "--dry-run", "--method", method,
                    "--home", str(self.settings.home)]
            if self.settings.store:
                args += ["--store", str(self.settings.store)]
            if namespace:
                args += ["--namespace", namespace]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with open(job.log, "wb") as out:
                job.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
            self._jobs[job.id] = job
            return job

    def get(self, caller: Principal, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None or (not caller.admin and job.owner != caller.namespace):
            raise NotFoundError(f"no job {job_id!r}")
        return job

    def list(self, caller: Principal) -> list[Job]:
        return sorted((j for j in self._jobs.values() if caller.admin or j.owner == caller.namespace),
                      key=lambda j: j.started, reverse=True)
