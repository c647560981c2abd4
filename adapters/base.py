"""Shared helpers for generator adapters: stop strings and a sync -> async bridge."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from kem.protocols import GenerationParams, Generator, Message


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Truncate ``text`` at the earliest stop string. Returns ``(text, stopped)``."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class AsyncBridge:
    """Async face of a sync :class:`~kem.protocols.Generator`: runs calls in a worker thread."""

    def __init__(self, generator: Generator) -> None:
        self.sync = generator
        self.name = generator.name

    async def agenerate(self, prompt: str, params: GenerationParams) -> str:
        return await asyncio.to_thread(self.sync.generate, prompt, params)

    async def achat(self, messages: Sequence[Message], params: GenerationParams) -> str:
        return await asyncio.to_thread(self.sync.chat, messages, params)

    async def astream(self, prompt: str, params: GenerationParams) -> AsyncIterator[str]:
        async for piece in _iterate_in_thread(self.sync.stream(prompt, params)):
            yield piece

    async def astream_chat(self, messages: Sequence[Message], params: GenerationParams) -> AsyncIterator[str]:
        async for piece in _iterate_in_thread(self.sync.stream_chat(messages, params)):
            yield piece


async def _iterate_in_thread(it: Iterator[Any]) -> AsyncIterator[Any]:
    sentinel = object()
    while True:
        item = await asyncio.to_thread(next, it, sentinel)
        if item is sentinel:
            return
        yield item


def to_async(generator: Any) -> Any:
    """Return an object with the async generator methods: the generator itself if it has them."""
    if hasattr(generator, "agenerate"):
        return generator
    return AsyncBridge(generator)
