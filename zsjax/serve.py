"""Serve a zsjax model over an OpenAI-compatible HTTP API (FastAPI on uvicorn).

    python -m zsjax.serve --model DIR [--host 127.0.0.1] [--port 6001] [--api-key KEY]
                          [--tensor N] [--data N] [--dtype bfloat16]

Endpoints: POST /v1/chat/completions (through the model's chat template), POST /v1/completions,
GET /v1/models, GET /health, GET /stats. Requests honour temperature, top_p, max_tokens, stop,
n and seed; any model name (also an empty one) selects the served model. Served this way, a
fine-tuned simulator answers the reference's `ask_llm` unchanged, and zsjax's own
`backend.kind=simulator_url` (`OpenAISimulatorBackend`) reaches it like an sglang server.

Concurrent requests are batched: after the first, requests are collected while they keep coming
(each within --batch-gap-ms of the last, for at most --batch-wait-ms), then the requests that
share temperature, top_p and stop strings decode together in one call of the
jitted sampler (`zsjax.sampling.generate`; each row draws from its own seed, so batching does
not change what a request gets). /stats counts requests and sampler calls.

Limits: --max-tokens (a request's max_tokens), --max-n, --max-request-bytes and the model's
context; a request past them gets a 400, a malformed one a 4xx, each with a JSON error body,
and the server keeps serving. It binds to loopback by default; with --api-key, a request
without `Authorization: Bearer KEY` gets a 401. SIGTERM and Ctrl-C shut it down gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import os
import queue
import secrets
import signal
import sys
import threading
import time
import uuid
from typing import Optional, Union

import fastapi
import uvicorn
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from zsjax import sharding
from zsjax.evaluate import load_policy
from zsjax.models.tokenizer import eos_ids
from zsjax.sampling import generate


# --- Requests (OpenAI's fields that zsjax honours; others are accepted and ignored) ---------

class _Sampling(BaseModel):
    model: Optional[str] = ""
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1)
    seed: Optional[int] = None


class ChatMessage(BaseModel):
    role: str
    content: Union[str, list[dict], None] = ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]


class RequestError(ValueError):
    """A request zsjax refuses (status 400)."""


# --- Batching --------------------------------------------------------------------------------

@dataclasses.dataclass
class _Job:
    prompts: list[list[int]]  # one per choice (n copies, or one per completion prompt)
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    row_seeds: list[int]
    future: concurrent.futures.Future

    @property
    def group(self):
        return (self.temperature, self.top_p, self.stop)


class Engine:
    """One thread that owns the model: it takes jobs from a queue and, after the first, keeps
    taking more while they keep coming (each within `gap_s` of the last, for at most `wait_s`
    in all, up to `max_batch` rows); then it decodes each group of compatible jobs in one
    sampler call. A lone request waits `gap_s`; a burst of clients lands in one batch."""

    def __init__(self, config, params, tokenizer, eos: tuple[int, ...], *, max_batch: int = 32,
                 wait_s: float = 0.2, gap_s: float = 0.02):
        self.config, self.params, self.tokenizer, self.eos = config, params, tokenizer, eos
        self.max_batch, self.wait_s, self.gap_s = max_batch, wait_s, gap_s
        self.requests = self.sampler_calls = self.rows = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="zsjax-serve-engine",
                                        daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> concurrent.futures.Future:
        self.requests += 1
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _collect(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        jobs, rows = [first], len(first.prompts)
        deadline = time.monotonic() + self.wait_s
        while rows < self.max_batch:
            left = min(self.gap_s, deadline - time.monotonic())
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this batch
                break
            jobs.append(job)
            rows += len(job.prompts)
        return jobs

    def _work(self) -> None:
        while (jobs := self._collect()) is not None:
            groups: dict = {}
            for job in jobs:
                groups.setdefault(job.group, []).append(job)
            for group in groups.values():
                try:
                    self._run(group)
                except Exception as e:  # noqa: BLE001  (the requests get it; serving goes on)
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(e)

    def _run(self, jobs: list[_Job]) -> None:
        temperature, top_p, stop = jobs[0].group
        prompts = [p for job in jobs for p in job.prompts]
        seeds = [s for job in jobs for s in job.row_seeds]
        result = generate(self.config, self.params, prompts,
                          max_new_tokens=max(job.max_tokens for job in jobs),
                          temperature=temperature, top_p=top_p, stop_strings=stop,
                          tokenizer=self.tokenizer, eos_token_ids=self.eos, row_seeds=seeds)
        self.sampler_calls += 1
        self.rows += len(prompts)
        k = 0
        for job in jobs:
            out = []
            for _ in job.prompts:
                tokens, reason = result.tokens[k], result.finish_reasons[k]
                if len(tokens) > job.max_tokens:  # a longer job shared the call: cut there
                    tokens, reason = tokens[:job.max_tokens], "length"
                out.append(self._choice(tokens, reason, stop))
                k += 1
            job.future.set_result(out)

    def _choice(self, tokens: list[int], reason: str, stop: tuple[str, ...]) -> dict:
        """OpenAI's choice: the text without the EOS or the stop string, and why it ended."""
        if reason == "eos" and tokens and tokens[-1] in self.eos:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if reason == "stop" or stop:
            cuts = [text.find(s) for s in stop if s in text]
            if cuts:
                text, reason = text[:min(cuts)], "stop"
        return {"text": text, "finish_reason": "length" if reason == "length" else "stop",
                "tokens": len(tokens)}


# --- The app ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Limits:
    max_tokens: int = 2048  # a request's max_tokens
    max_n: int = 16
    max_request_bytes: int = 1 << 20
    default_max_tokens: int = 256


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)


def create_app(engine: Engine, model_name: str, *, api_key: str = "",
               limits: Limits = Limits()) -> fastapi.FastAPI:
    app = fastapi.FastAPI(title="zsjax", docs_url=None, redoc_url=None)
    tok = engine.tokenizer
    context = engine.config.max_position_embeddings

    @app.middleware("http")
    async def guard(request: fastapi.Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limits.max_request_bytes):
            return _error(413, f"request body over {limits.max_request_bytes} bytes")
        if api_key and request.url.path != "/health" and request.headers.get(
                "authorization", "") != f"Bearer {api_key}":
            return _error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                          "authentication_error")
        return await call_next(request)

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def invalid(request, exc):
        where = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
                          for e in exc.errors())
        return _error(422, f"invalid request: {where}")

    @app.exception_handler(RequestError)
    async def refused(request, exc):
        return _error(400, str(exc))

    def job(prompts: list[list[int]], r: _Sampling) -> _Job:
        max_tokens = r.max_completion_tokens or r.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise RequestError(f"max_tokens={max_tokens} is over this server's limit "
                               f"({limits.max_tokens}, --max-tokens)")
        if r.n > limits.max_n:
            raise RequestError(f"n={r.n} is over this server's limit ({limits.max_n}, --max-n)")
        for p in prompts:
            if not p:
                raise RequestError("the prompt is empty")
            if len(p) + max_tokens > context:
                raise RequestError(f"prompt ({len(p)} tokens) + max_tokens ({max_tokens}) is "
                                   f"over the model's context ({context})")
        stop = (r.stop,) if isinstance(r.stop, str) else tuple(s for s in r.stop or () if s)
        base = r.seed if r.seed is not None else secrets.randbits(31)
        seeds = [(base * 65_537 + i) % (1 << 32) for i in range(len(prompts))]
        return _Job(prompts, max_tokens, r.temperature, r.top_p, stop, seeds,
                    concurrent.futures.Future())

    async def run(j: _Job) -> list[dict]:
        return await asyncio.wrap_future(engine.submit(j))

    def usage(prompt_tokens: int, choices) -> dict:
        c = sum(ch["tokens"] for ch in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": c,
                "total_tokens": prompt_tokens + c}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return {"requests": engine.requests, "sampler_calls": engine.sampler_calls,
                "rows": engine.rows}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "zsjax"}]}

    @app.post("/v1/chat/completions")
    async def chat(r: ChatRequest):
        if not getattr(tok, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template: use "
                               "/v1/completions")
        messages = [{"role": m.role, "content": _text(m.content)} for m in r.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001  (a template's own error, e.g. roles it refuses)
            raise RequestError(f"the chat template refused the messages: {e}") from None
        ids = tok.encode(text, add_special_tokens=False)
        choices = await run(job([ids] * r.n, r))
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": model_name,
                "choices": [{"index": i, "finish_reason": c["finish_reason"],
                             "message": {"role": "assistant", "content": c["text"]}}
                            for i, c in enumerate(choices)],
                "usage": usage(len(ids), choices)}

    @app.post("/v1/completions")
    async def completions(r: CompletionRequest):
        texts = [r.prompt] if isinstance(r.prompt, str) else r.prompt
        if not texts:
            raise RequestError("prompt is an empty list")
        ids = [tok.encode(t) for t in texts]
        prompts = [p for p in ids for _ in range(r.n)]  # OpenAI's order: prompt-major
        choices = await run(job(prompts, r))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": model_name,
                "choices": [{"index": i, "text": c["text"], "finish_reason": c["finish_reason"],
                             "logprobs": None} for i, c in enumerate(choices)],
                "usage": usage(sum(len(p) for p in ids), choices)}

    return app


def _text(content) -> str:
    """A message's content: a string, or OpenAI's list of parts (their text parts joined)."""
    if isinstance(content, str) or content is None:
        return content or ""
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


# --- The command line ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zsjax.serve",
                                description="Serve a zsjax model over an OpenAI-compatible API.")
    p.add_argument("--model", required=True,
                   help="a Hugging Face folder, a zsjax.train workdir or its checkpoints/")
    p.add_argument("--name", default="", help="the model's name in /v1/models (default: the "
                   "folder's name); requests may name any model")
    p.add_argument("--host", default="127.0.0.1", help="default loopback only")
    p.add_argument("--port", type=int, default=6001)
    p.add_argument("--api-key", default=os.environ.get("ZSJAX_API_KEY", ""),
                   help="require Authorization: Bearer KEY (default $ZSJAX_API_KEY, or none)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    for axis in ("data", "fsdp", "tensor"):
        p.add_argument(f"--{axis}", type=int, default=1,
                       help=f"mesh size along {axis} (-1: the remaining devices); as the "
                       "configs' mesh.*")
    p.add_argument("--max-batch", type=int, default=32, help="rows per sampler call")
    p.add_argument("--batch-wait-ms", type=float, default=200.0,
                   help="the longest a request waits for others to batch with")
    p.add_argument("--batch-gap-ms", type=float, default=20.0,
                   help="a batch closes when no request came for this long")
    p.add_argument("--max-tokens", type=int, default=2048, help="a request's max_tokens limit")
    p.add_argument("--max-n", type=int, default=16)
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for key in ("max_batch", "max_tokens", "max_n", "max_request_bytes"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in [0, 65535]; got {args.port}")
    try:
        mesh = sharding.mesh_from_config(args.data, args.fsdp, args.tensor)
        config, params, tokenizer = load_policy(args.model, dtype=args.dtype, mesh=mesh)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.path.isfile(os.path.join(args.model, "config.json")):  # a Hugging Face folder
        eos = eos_ids(args.model, config, tokenizer)
    else:  # a training workdir: the config's and the tokenizer's
        eos = tuple(sorted(set(config.eos_token_ids) | {tokenizer.eos_token_id} - {None}))
    engine = Engine(config, params, tokenizer, eos, max_batch=args.max_batch,
                    wait_s=args.batch_wait_ms / 1000, gap_s=args.batch_gap_ms / 1000)
    name = args.name or os.path.basename(os.path.normpath(args.model))
    app = create_app(engine, name, api_key=args.api_key,
                     limits=Limits(max_tokens=args.max_tokens, max_n=args.max_n,
                                   max_request_bytes=args.max_request_bytes))
    print(f"[serve] {name} on http://{args.host}:{args.port}/v1 (Ctrl-C or SIGTERM stops it)",
          file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM and SIGINT (it stops accepting, answers what is in flight, then
    # returns) and then raises the signal again for the handler it found: a no-op here, so the
    # process ends with status 0 after its shutdown rather than being killed by the signal.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("[serve] stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
