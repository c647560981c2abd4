"""LangChain integration (the ``langchain`` extra): wrap any chat model with kem's edit memory.

* :func:`with_edits` returns a Runnable: messages in, the wrapped model's message out, with the
  in-scope edits put into the request first (``invoke`` / ``stream`` / ``batch`` and their async forms;
  composes with ``|``). The applied edits are in ``response_metadata["kem"]`` of the output.
* :class:`EditRetriever` is a ``BaseRetriever`` over the edit memory (one Document per edit).
* :class:`KemChatModel` is a LangChain chat model over any kem generator (the embedded SmolLM2 by
  default), so the above runs without a hosted model.

``langchain_core`` is imported when this module is, so import it only where LangChain is installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    convert_to_messages,
    convert_to_openai_messages,
)
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompt_values import PromptValue
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableConfig
from pydantic import ConfigDict

from kem.protocols import GenerationParams, ScoredEdit


def _as_messages(value: LanguageModelInput) -> list[BaseMessage]:
    if isinstance(value, str):
        return [HumanMessage(value)]
    if isinstance(value, PromptValue):
        return value.to_messages()
    return list(convert_to_messages(value))  # type: ignore[arg-type]


def _provenance(applied: Sequence[ScoredEdit], namespace: str | None) -> dict[str, Any]:
    return {"namespace": namespace,
            "edits": [{"id": s.edit.id, "score": round(float(s.score), 4), "subject": s.edit.subject,
                       "target_new": s.edit.target_new} for s in applied]}


def _tag(msg: Any, info: dict[str, Any]) -> Any:
    meta = getattr(msg, "response_metadata", None)
    if isinstance(meta, dict):
        meta["kem"] = info
    return msg


class EditedChatModel(Runnable[LanguageModelInput, BaseMessage]):
    """A chat model behind kem's fast path (see :func:`with_edits`)."""

    def __init__(self, model: BaseChatModel | Runnable, editor: Any, namespace: str | None = None,
                 as_of: datetime | None = None) -> None:
        self.model = model
        self.editor = editor
        self.namespace = namespace
        self.as_of = as_of

    @property
    def InputType(self) -> Any:  # noqa: N802 - LangChain's name
        return LanguageModelInput

    @property
    def OutputType(self) -> Any:  # noqa: N802
        return BaseMessage

    def rewrite(self, value: LanguageModelInput) -> tuple[list[BaseMessage], dict[str, Any]]:
        """The request the wrapped model gets, and the provenance of the edits applied to it."""
        msgs = _as_messages(value)
        # the wrapped chat model is not kem's engine: it has no edit-follower, so IKE prompting
        rw = self.editor.rewrite_chat(convert_to_openai_messages(msgs), self.namespace, follower=None,
                                      as_of=self.as_of)
        info = _provenance(rw.applied, self.namespace or self.editor.settings.namespace)
        if not rw.applied:
            return msgs, info  # out of scope: the caller's messages, unchanged
        return list(convert_to_messages(rw.request)), info

    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any) -> BaseMessage:
        msgs, info = self.rewrite(input)
        return _tag(self.model.invoke(msgs, config, **kwargs), info)

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None,
                      **kwargs: Any) -> BaseMessage:
        msgs, info = await asyncio.to_thread(self.rewrite, input)
        return _tag(await self.model.ainvoke(msgs, config, **kwargs), info)

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None,
               **kwargs: Any) -> Iterator[BaseMessage]:
        msgs, info = self.rewrite(input)
        first = True
        for chunk in self.model.stream(msgs, config, **kwargs):
            yield _tag(chunk, info) if first else chunk
            first = False

    async def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None,
                      **kwargs: Any) -> AsyncIterator[BaseMessage]:
        msgs, info = await asyncio.to_thread(self.rewrite, input)
        first = True
        async for chunk in self.model.astream(msgs, config, **kwargs):
            yield _tag(chunk, info) if first else chunk
            first = False


def with_edits(chat_model: BaseChatModel | Runnable, editor: Any, namespace: str | None = None,
               as_of: datetime | None = None) -> EditedChatModel:
    """Wrap ``chat_model`` so that every request first goes through ``editor``'s fast path.

    Args:
        chat_model: Any LangChain chat model (or a Runnable taking messages).
        editor: A :class:`kem.KnowledgeEditor`.
        namespace: Whose edits apply (default: the editor's settings' namespace).
        as_of: Apply the edits that held at this time (default: now; docs/time.md).

    Example::

        chain = prompt | with_edits(ChatOpenAI(...), ke, namespace="alice") | StrOutputParser()
    """
    return EditedChatModel(chat_model, editor, namespace, as_of)


class EditRetriever(BaseRetriever):
    """Retrieves edits as Documents: ``page_content`` is the fact, ``metadata`` the edit's id, subject,
    target, score and scope verdict.

    Attributes:
        editor: A :class:`kem.KnowledgeEditor`.
        namespace: Whose edits (default: the editor's settings' namespace).
        k: How many edits to retrieve.
        in_scope_only: Keep only edits the scope classifier applies to the query.
        as_of: The edits that held at this time (default: now).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    editor: Any
    namespace: str | None = None
    k: int = 4
    in_scope_only: bool = False
    as_of: datetime | None = None

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        hits = self.editor.retrieve(query, self.namespace, self.k, as_of=self.as_of)
        return [Document(page_content=s.edit.fact, id=s.edit.id, metadata={
            "id": s.edit.id, "namespace": s.edit.namespace, "subject": s.edit.subject,
            "target_new": s.edit.target_new, "score": float(s.score), "in_scope": s.in_scope})
            for s in hits if s.in_scope or not self.in_scope_only]


class KemChatModel(BaseChatModel):
    """A LangChain chat model over a kem :class:`~kem.protocols.Generator` (greedy unless
    ``temperature`` > 0). No edits are applied here: wrap it with :func:`with_edits` for that.

    Attributes:
        generator: e.g. ``KnowledgeEditor.generator`` (the embedded SmolLM2) or any kem engine.
        max_tokens: Generation length.
        temperature: Sampling temperature (0: greedy).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    generator: Any
    max_tokens: int = 32
    temperature: float = 0.0

    @property
    def _llm_type(self) -> str:
        return "kem"

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        params = GenerationParams(max_new_tokens=kwargs.get("max_tokens", self.max_tokens),
                                  temperature=self.temperature, stop=tuple(stop or ()))
        text = self.generator.chat(convert_to_openai_messages(messages), params)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(
            text, response_metadata={"model_name": getattr(self.generator, "name", "kem")}))])
