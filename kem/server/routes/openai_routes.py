"""The OpenAI-compatible endpoints: chat completions, completions and the model list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kem.edit import parse_time
from kem.server.protocol import ChatCompletionRequest, CompletionRequest
from kem.server.routes.deps import no_edits, parse, principal, respond, serving

router = APIRouter()


async def _serve(request: Request, model: Any) -> Response:
    p = principal(request)
    raw = await request.body()
    req = parse(model, raw, model.__name__)
    ns = p.namespace_for(request.headers.get("x-kem-namespace"))
    return respond(await serving(request).serve(req, raw, ns, caller=p, disconnected=request.is_disconnected,
                                                as_of=parse_time(request.headers.get("x-kem-as-of"), "x-kem-as-of"),
                                                use_edits=not no_edits(request)))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _serve(request, ChatCompletionRequest)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _serve(request, CompletionRequest)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    principal(request)
    return serving(request).models().model_dump()
