"""Search backends behind HTTP: an OpenAI-compatible simulator server, and a real retriever.

- `OpenAISimulatorBackend`: chat completions as served by vLLM, sglang or llama.cpp, with
  concurrent requests, per-request timeouts, bounded retries with exponential backoff, and a
  clear error naming the URL when the server is down (the reference retries forever).
- `RetrieverBackend`: the Search-R1 retriever API, `POST /retrieve` with
  `{"queries": [...], "topk": k}`; documents are formatted as the reference formats them,
  `Doc i(Title: ...) text` lines.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from zsjax.search.backend import SearchRequest
from zsjax.search.bm25 import Passage, format_passages
from zsjax.search.simulator import chat_messages, generation_keys, postprocess_documents


class SearchBackendError(RuntimeError):
    """A search backend could not produce documents."""


def _post_json(url: str, payload: dict, *, timeout: float, retries: int, backoff: float,
               what: str) -> dict:
    """POSTs JSON; retries connection errors, timeouts, 429 and 5xx (at most `retries` extra
    attempts, sleeping backoff * 2**k); other HTTP errors fail at once."""
    data = json.dumps(payload).encode()
    last = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            body = e.read()[:300].decode(errors="replace")
            if e.code != 429 and e.code < 500:
                raise SearchBackendError(f"{what} at {url} rejected the request: HTTP {e.code}: "
                                         f"{body}") from None
            last = f"HTTP {e.code}: {body}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError,
                http.client.HTTPException) as e:  # (HTTPException: a cut or garbled reply)
            reason = getattr(e, "reason", e)
            last = f"{type(reason).__name__}: {reason}"
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SearchBackendError(f"{what} at {url} returned invalid JSON: {e}") from None
    raise SearchBackendError(f"{what} at {url} failed after {retries + 1} attempts (last error: "
                             f"{last}); is the server running and reachable?")


def _chat_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def _served_model(chat_url: str, timeout: float) -> str | None:
    """The first model id the server lists at GET .../v1/models, or None when it lists none."""
    url = chat_url.removesuffix("/chat/completions") + "/models"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())["data"][0]["id"]
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError):
        return None


class OpenAISimulatorBackend:
    """The simulator as an OpenAI-compatible chat-completions server. `model`: the served
    model's name; by default the first one the server lists (vLLM rejects names it does not
    serve), or none at all when it lists none (sglang and llama.cpp ignore it)."""

    def __init__(self, url: str, *, model: str | None = None, style: str = "finetuned",
                 temperature: float = 0.8, max_new_tokens: int = 600, top_k_docs: int = 5,
                 concurrency: int = 16, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5):
        self.url = _chat_url(url)
        self.model, self.style = model, style
        self.temperature, self.max_new_tokens, self.top_k_docs = (temperature, max_new_tokens,
                                                                  top_k_docs)
        self.concurrency, self.timeout = concurrency, timeout
        self.retries, self.backoff = retries, backoff

    @property
    def samples(self) -> bool:
        """Whether identical requests with different `sample`s get their own documents."""
        return self.temperature > 0

    def _one(self, prompt: str) -> str:
        payload = {"messages": chat_messages(prompt),
                   "temperature": self.temperature, "max_tokens": self.max_new_tokens}
        if self.model:
            payload["model"] = self.model
        reply = _post_json(self.url, payload, timeout=self.timeout, retries=self.retries,
                           backoff=self.backoff, what="simulator server")
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise SearchBackendError(f"simulator server at {self.url} returned no "
                                     f"choices[0].message.content: {str(reply)[:300]}") from None
        return postprocess_documents(text or "", self.top_k_docs)

    def search(self, requests: Sequence[SearchRequest]) -> list[str]:
        keys = generation_keys(requests, self.style, self.samples)  # one call each
        unique = list(dict.fromkeys(keys))
        if not unique:
            return []
        if self.model is None:
            self.model = _served_model(self.url, self.timeout) or ""
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(unique))) as pool:
            docs = dict(zip(unique, pool.map(self._one, [p for p, _ in unique])))
        return [docs[k] for k in keys]


def format_retrieved(items: list) -> str:
    """Search-R1 retriever results (`contents` = "title\ntext") -> the reference's
    `Doc i(Title: ...) text` lines (`zsjax.search.bm25.format_passages`)."""
    passages = []
    for item in items:
        doc = item.get("document", item) if isinstance(item, dict) else {"contents": str(item)}
        title, _, text = str(doc.get("contents", "")).strip().partition("\n")
        passages.append(Passage("", title.strip(), text.strip()) if text.strip()
                        else Passage("", "", title.strip()))
    return format_passages(passages)


class RetrieverBackend:
    """A real search engine speaking the Search-R1 retriever API. Ignores useful/noisy."""

    def __init__(self, url: str, *, topk: int = 3, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5):
        url = url.rstrip("/")
        self.url = url if url.endswith("/retrieve") else url + "/retrieve"
        self.topk, self.timeout, self.retries, self.backoff = topk, timeout, retries, backoff

    def search(self, requests: Sequence[SearchRequest]) -> list[str]:
        if not requests:
            return []
        queries = [r.query for r in requests]
        reply = _post_json(self.url, {"queries": queries, "topk": self.topk,
                                      "return_scores": True},
                           timeout=self.timeout, retries=self.retries, backoff=self.backoff,
                           what="retriever")
        results = reply.get("result") if isinstance(reply, dict) else None
        if not isinstance(results, list) or len(results) != len(queries):
            raise SearchBackendError(f"retriever at {self.url} returned "
                                     f"{'no result list' if results is None else len(results)}"
                                     f" results for {len(queries)} queries")
        return [format_retrieved(items) for items in results]
