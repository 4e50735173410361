"""`python -m dafast.serve [MODEL] [--port 8080]`: a local OpenAI-compatible chat endpoint.

The offline teacher and judge, and what the tests talk to: FastAPI + uvicorn over
transformers' generate with the model's chat template (dafast.generation). MODEL is the default
model (the embedded SmolLM2-135M-Instruct) or any local model directory, e.g. a trained
variant. It serves

    GET  /health                  200 once the model is loaded
    GET  /v1/models               the one model, under --name
    POST /v1/chat/completions     messages, temperature, top_p, max_tokens (or
                                  max_completion_tokens), seed, and, as vLLM takes them, top_k
                                  and repetition_penalty; response_format {"type":
                                  "json_schema", "json_schema": {"schema": ...}} (OpenAI's) or
                                  {"type": "json_object", "schema": ...} constrains the answer
                                  to the schema

Not served: streaming, tools, several choices (n > 1); asking for them is a 400 answer, never
a silent approximation. A 135M model answers in the right form, not with expert content: it
checks the plumbing, not the science.
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    # Clients send fields this server does not use (user, metadata, ...): ignored, as
    # OpenAI-compatible servers do; the ones that would change the answer are refused below.
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    response_format: dict[str, Any] | None = None
    n: int = 1
    stream: bool = False
    tools: list | None = None


def schema_of(response_format: dict | None) -> dict | None:
    """The JSON schema a response_format asks for; None for plain text. ValueError if unusable."""
    if not response_format or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
    elif kind == "json_object":
        schema = response_format.get("schema") or {"type": "object"}
    else:
        raise ValueError(f"response_format.type must be text, json_object or json_schema, "
                         f"got {kind!r}")
    if not isinstance(schema, dict):
        raise ValueError("response_format: the JSON schema must be an object")
    return schema


def create_app(chat_model, name: str, default_max_tokens: int = 512):
    from fastapi import FastAPI, HTTPException
    from fastapi.concurrency import run_in_threadpool

    from dafast.generation import SchemaError

    app = FastAPI(title="dafast local endpoint")

    @app.get("/health")
    def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "dafast",
                                            "created": 0}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        if request.stream or request.n != 1 or request.tools:
            raise HTTPException(400, "this server answers one choice, without streaming or tools")
        try:
            schema = schema_of(request.response_format)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        try:
            # Generation blocks for seconds: off the event loop, so /health still answers.
            out = await run_in_threadpool(
                chat_model.generate, [m.model_dump() for m in request.messages],
                max_tokens=request.max_completion_tokens or request.max_tokens or default_max_tokens,
                temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                repetition_penalty=request.repetition_penalty, seed=request.seed, schema=schema)
        except SchemaError as e:
            raise HTTPException(400, str(e)) from None
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "finish_reason": out.finish_reason,
                         "message": {"role": "assistant", "content": out.text}}],
            "usage": {"prompt_tokens": out.prompt_tokens,
                      "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens},
        }

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dafast.serve",
                                     description="Serve a local model as an OpenAI-compatible "
                                                 "chat endpoint (the offline teacher and judge).")
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct",
                        help="the default model's name or a local model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--name", default=None,
                        help="model name reported to clients (default: the MODEL argument)")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="answer length when a request sets none")
    args = parser.parse_args(argv)

    import uvicorn

    from dafast.generation import ChatModel
    from dafast.models import resolve_model

    chat_model = ChatModel(resolve_model(args.model))
    app = create_app(chat_model, args.name or args.model, args.max_tokens)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
