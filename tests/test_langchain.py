"""LangChain against kem: ``ChatOpenAI`` pointed at ``kem serve``, and ``with_edits`` around a chat model
in an LCEL chain (invoke, stream, batch, async), plus ``EditRetriever``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.conftest import kem_server

pytest.importorskip("langchain_openai")

from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402

from kem.adapters.langchain import EditRetriever, with_edits  # noqa: E402

QUESTION = "Who is the CEO of Kem Corporation?"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = kem_server(Path(tmp_path_factory.mktemp("lc")), "lc").start()
    try:
        yield s.wait()
    finally:
        s.stop()


def chat_model(server, namespace: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=server.url + "/v1", api_key="none", model="default", temperature=0, max_tokens=12,
                      max_retries=0, default_headers={"x-kem-namespace": namespace})


def test_chat_openai_pointed_at_kem(server):
    httpx.post(server.url + "/v1/edits", headers={"x-kem-namespace": "lc"}, json={
        "subject": "Kem Corporation", "prompt": "The CEO of {} is", "target_new": "Alice Zhang"}).raise_for_status()
    prompt = ChatPromptTemplate.from_messages([("user", "{question}")])
    chain = prompt | chat_model(server, "lc") | StrOutputParser()
    assert "Alice Zhang" in chain.invoke({"question": QUESTION})
    assert "Alice Zhang" in "".join(chain.stream({"question": QUESTION}))
    msg = chat_model(server, "lc").invoke(QUESTION)
    assert msg.response_metadata.get("model_name") == "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def editor():
    from kem import Edit, KnowledgeEditor

    ke = KnowledgeEditor.in_memory()
    ke.add(Edit(subject="Kem Corporation", prompt="The CEO of {} is", target_new="Alice Zhang", namespace="alice"))
    return ke


def test_with_edits_runnable_in_an_lcel_chain(server, editor):
    raw = chat_model(server, "nobody")  # the server applies nothing in this namespace: a plain model
    assert "Alice Zhang" not in raw.invoke(QUESTION).content
    edited = with_edits(raw, editor, namespace="alice")
    msg = edited.invoke(QUESTION)
    assert "Alice Zhang" in msg.content and msg.response_metadata["kem"]["edits"][0]["subject"] == "Kem Corporation"
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | edited | StrOutputParser()
    assert "Alice Zhang" in chain.invoke({"q": QUESTION})
    assert "Alice Zhang" in "".join(chain.stream({"q": QUESTION}))
    out = chain.batch([{"q": QUESTION}, {"q": "What is the capital of Japan?"}])
    assert "Alice Zhang" in out[0] and "Tokyo" in out[1]

    async def both() -> tuple[str, str]:  # one event loop: the model's async client is bound to it
        return (await chain.ainvoke({"q": QUESTION}),
                "".join([piece async for piece in chain.astream({"q": QUESTION})]))

    via_ainvoke, via_astream = asyncio.run(both())
    assert "Alice Zhang" in via_ainvoke and "Alice Zhang" in via_astream
    # out of scope: the model gets the caller's messages unchanged
    plain = with_edits(raw, editor, namespace="bob").invoke(QUESTION)
    assert plain.content == raw.invoke(QUESTION).content and plain.response_metadata["kem"]["edits"] == []


def test_edit_retriever(editor):
    docs = EditRetriever(editor=editor, namespace="alice", k=2).invoke(QUESTION)
    assert docs and docs[0].metadata["target_new"] == "Alice Zhang" and docs[0].metadata["in_scope"]
    assert EditRetriever(editor=editor, namespace="bob").invoke(QUESTION) == []
    assert EditRetriever(editor=editor, namespace="alice", in_scope_only=True).invoke("Bananas are yellow") == []


def test_edit_retriever_as_of():
    from datetime import UTC, datetime

    from kem import Edit, KnowledgeEditor

    ke = KnowledgeEditor.in_memory()
    ke.add(Edit(subject="Kem Corporation", prompt="The CEO of {} is", target_new="Ann Old", namespace="t",
                valid_from=datetime(2020, 1, 1, tzinfo=UTC)))
    ke.add(Edit(subject="Kem Corporation", prompt="The CEO of {} is", target_new="Ben New", namespace="t",
                valid_from=datetime(2024, 1, 1, tzinfo=UTC)))
    now = EditRetriever(editor=ke, namespace="t", k=2).invoke(QUESTION)
    then = EditRetriever(editor=ke, namespace="t", k=2, as_of=datetime(2022, 1, 1, tzinfo=UTC)).invoke(QUESTION)
    assert [d.metadata["target_new"] for d in now] == ["Ben New"]
    assert [d.metadata["target_new"] for d in then] == ["Ann Old"]
    assert with_edits(object(), ke, namespace="t", as_of=datetime(2022, 1, 1, tzinfo=UTC)).rewrite(
        QUESTION)[1]["edits"][0]["target_new"] == "Ann Old"
