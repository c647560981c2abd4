"""Shared test fixtures. The real tiny models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) load ONCE per
test session; tests that mutate weights deep-copy the model."""

from __future__ import annotations

import os
import os as _os
import signal as _signal
import socket as _socket
import subprocess as _subprocess
import sys as _sys
import time as _time
from pathlib import Path as _Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see kem/runtime.py

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def shared_data(*parts: str) -> str:
    """Path of a file under ../shared/data (the repo's sibling folder, in CI too)."""
    path = os.path.normpath(os.path.join(DATA, *parts))
    if not os.path.exists(path):
        pytest.fail(f"benchmark data missing: {path} (../shared/data must sit beside the repo)")
    return path


@pytest.fixture(scope="session")
def kem_settings():
    from kem.settings import Settings

    return Settings(device="cpu")


@pytest.fixture(scope="session")
def lm_and_tok(kem_settings):
    """(model, tokenizer) of SmolLM2-135M-Instruct, float32 on CPU, loaded once. Do not mutate: deep-copy."""
    from kem.models import load_causal_lm

    return load_causal_lm(kem_settings.model, kem_settings.cache_dir, device="cpu")


@pytest.fixture(scope="session")
def generator(lm_and_tok):
    from kem.adapters.transformers import TransformersGenerator

    model, tok = lm_and_tok
    return TransformersGenerator(model, tok, name="smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tenant_adapters(lm_and_tok, tmp_path_factory):
    """Two tenants' fact adapters (``tests.generator_conformance.TENANT_FACTS``: the same prompt answered
    differently), as ``{tenant: LoraRef}``; built once per session (a few seconds, no training)."""
    from tests.generator_conformance import build_tenant_adapters

    model, tok = lm_and_tok
    return build_tenant_adapters(model, tok, tmp_path_factory.mktemp("tenant-adapters"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (request it from a module-scoped autouse fixture): on a shared
    2-core machine two threads spin against other processes and ran generation ~6x slower (measured);
    restored afterwards. ``KEM_TEST_THREADS`` overrides."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("KEM_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def embedder(kem_settings):
    from kem.embedding import make_embedder

    return make_embedder(kem_settings)  # the default backend (KEM_EMBEDDER_BACKEND picks another)


# ---- servers started as subprocesses (test_server.py, test_langchain.py, test_vllm.py) ----------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started with ``python -m ...`` on 127.0.0.1 in its own process group, with its log kept.

    ``start()`` returns at once (start several, then ``wait()`` each); ``stop()`` ends the whole group.
    """

    def __init__(self, args: list[str], port: int, log_path: _Path, *, python: str | None = None,
                 env: dict[str, str] | None = None, health: str = "/healthz") -> None:
        self.args, self.port, self.log_path, self.health = args, port, _Path(log_path), health
        self.python = python or _sys.executable
        self.env = {**_os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: _subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self._log = open(self.log_path, "wb")
        self.proc = _subprocess.Popen([self.python, *self.args], stdout=self._log, stderr=_subprocess.STDOUT,
                                      env=self.env, start_new_session=True, cwd=_Path(__file__).parent.parent)
        return self

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait(self, timeout: float = 240.0) -> ServerProcess:
        import httpx

        deadline = _time.monotonic() + timeout
        while _time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.health, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            _time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not up after {timeout:.0f} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server's process group (a crash, as far as clients can tell)."""
        if self.proc is not None and self.proc.poll() is None:
            _os.killpg(self.proc.pid, _signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                _os.killpg(self.proc.pid, _signal.SIGTERM)
                self.proc.wait(20)
            except (_subprocess.TimeoutExpired, ProcessLookupError):
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()


def kem_server(tmp: _Path, name: str, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    """A ``kem serve`` subprocess (not started) with its home and log under ``tmp``."""
    port = free_port()
    args = ["-m", "kem.server", "serve", "--port", str(port), "--home", str(tmp / f"{name}-home"),
            "--log-level", "warning", *extra]
    return ServerProcess(args, port, tmp / f"{name}.log", env=env)



# ---- a real PostgreSQL (tests/postgres_server.py), started once per session when a test asks -------


@pytest.fixture(scope="session")
def postgres_server():
    """A throw-away PostgreSQL 15 on 127.0.0.1 (Debian's binaries); fails, never skips, when it cannot start."""
    from tests.postgres_server import PostgresServer

    try:
        server = PostgresServer().start()
    except RuntimeError as exc:
        pytest.fail(f"cannot start PostgreSQL for the tests: {exc}")
    yield server
    server.close()


@pytest.fixture
def pg_url(postgres_server):
    """A URL of the session's PostgreSQL naming a fresh, empty schema (one test's own tables)."""
    return postgres_server.fresh_url()
