"""Every engine passes the same generator conformance suite (tests/generator_conformance.py): the
transformers engine in-process, the OpenAI-compatible HTTP engine against a real ``kem serve`` on
127.0.0.1 here, and (in tests/test_vllm.py) the HTTP engine against ``vllm serve`` and the in-process
vLLM engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import kem_server
from tests.generator_conformance import AdapterConformance, GeneratorConformance


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


class TestTransformersEngine(GeneratorConformance):
    @pytest.fixture
    def engine(self, generator):
        return generator


class TestTransformersEngineAdapters(AdapterConformance):
    """Tenants' adapters (LoraRef per request) on the transformers engine."""

    @pytest.fixture
    def engine(self, generator):
        return generator

    @pytest.fixture
    def adapters(self, tenant_adapters):
        return tenant_adapters


@pytest.fixture(scope="module")
def http_engine(tmp_path_factory: pytest.TempPathFactory):
    from kem.adapters.openai_http import OpenAIHTTPGenerator

    tmp: Path = tmp_path_factory.mktemp("conformance")
    server = kem_server(tmp, "upstream", env={"KEM_TEST_THREADS": "1"}).start()
    try:
        server.wait()
        gen = OpenAIHTTPGenerator(server.url)
        yield gen
    finally:
        server.stop()


class TestOpenAIHTTPEngine(GeneratorConformance):
    @pytest.fixture
    def engine(self, http_engine):
        return http_engine
