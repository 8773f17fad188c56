"""HTTP backends against small servers on 127.0.0.1 (bounded: every request has a timeout)."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from zsjax.search import SearchRequest
from zsjax.search.http_backends import (OpenAISimulatorBackend, RetrieverBackend,
                                        SearchBackendError)


class _Server:
    """A scripted JSON server: `handler(path, body) -> (status, reply)`; logs requests."""

    def __init__(self, handler, models=None):
        """`models`: ids listed at GET /v1/models (None: GET is not served). A handler's status
        "cut" sends a 200 reply whose body stops short of its Content-Length."""
        self.log, outer = [], self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.log.append((self.path, body))
                status, reply = handler(self.path, body)
                data = json.dumps(reply).encode()
                self.send_response(200 if status == "cut" else status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data) + 100 * (status == "cut")))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if models is None or self.path != "/v1/models":
                    self.send_error(404)
                    return
                data = json.dumps({"data": [{"id": m} for m in models]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _chat_reply(text):
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


REQS = [SearchRequest("q1", "Question one?", ("A1",)), SearchRequest("q2", "Question two?",
                                                                      ("A2",), noisy=True),
        SearchRequest("q1", "Question one?", ("A1",))]


def test_openai_backend_concurrent_and_deduplicated():
    active, peak = [0], [0]
    lock = threading.Lock()

    def handler(path, body):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        # the reference's chat: an empty system message, then the prompt
        assert body["messages"][0] == {"role": "system", "content": ""}
        prompt = body["messages"][1]["content"]
        return 200, _chat_reply(f"Doc 1: for {prompt.split('Query: ')[1].split(chr(10))[0]}"
                                "\n\nDoc 2: x\nDoc 6: cut")

    many = [SearchRequest(f"q{i}", "Q?", ("A",)) for i in range(8)]
    with _Server(handler) as srv:
        backend = OpenAISimulatorBackend(srv.url, concurrency=8, timeout=10)
        docs = backend.search(REQS)
        assert docs[0] == docs[2] == "Doc 1: for q1\nDoc 2: x"
        assert len(srv.log) == 2 and all(p == "/v1/chat/completions" for p, _ in srv.log)
        prompts = [body["messages"][1]["content"] for _, body in srv.log]  # concurrent: any order
        assert sum("Noisy Output" in p for p in prompts) == 1
        assert all(b["temperature"] == 0.8 and b["max_tokens"] == 600 for _, b in srv.log)
        start = time.time()
        backend.search(many)
        assert peak[0] > 1 and time.time() - start < 8 * 0.2  # ran concurrently


def test_openai_backend_retries_server_errors_then_succeeds():
    calls = [0]

    def handler(path, body):
        calls[0] += 1
        return (500, {"error": "busy"}) if calls[0] < 3 else (200, _chat_reply("Doc 1: ok"))

    with _Server(handler) as srv:
        backend = OpenAISimulatorBackend(srv.url + "/v1", retries=3, backoff=0.01, timeout=5)
        assert backend.search(REQS[:1]) == ["Doc 1: ok"] and calls[0] == 3


def test_openai_backend_names_the_served_model():
    """vLLM rejects a model name it does not serve: the backend names the first model the
    server lists, the one it is given, or none when the server lists none."""
    reply = lambda path, body: (200, _chat_reply("Doc 1: ok"))  # noqa: E731
    with _Server(reply, models=["/models/Simulator-14B", "other"]) as srv:
        OpenAISimulatorBackend(srv.url, timeout=5).search(REQS[:1])
        OpenAISimulatorBackend(srv.url, model="other", timeout=5).search(REQS[:1])
        assert [b["model"] for _, b in srv.log] == ["/models/Simulator-14B", "other"]
    with _Server(reply) as srv:  # no /v1/models (llama.cpp's older servers)
        OpenAISimulatorBackend(srv.url, timeout=5).search(REQS[:1])
        assert "model" not in srv.log[0][1]


def test_openai_backend_retries_a_cut_reply():
    """A reply whose body stops short of its Content-Length (a dying server, a proxy) is
    retried like a connection error, not raised as http.client.IncompleteRead."""
    calls = [0]

    def handler(path, body):
        calls[0] += 1
        return ("cut" if calls[0] == 1 else 200), _chat_reply("Doc 1: ok")

    with _Server(handler) as srv:
        backend = OpenAISimulatorBackend(srv.url, retries=2, backoff=0.01, timeout=5)
        assert backend.search(REQS[:1]) == ["Doc 1: ok"] and calls[0] == 2
    with _Server(lambda path, body: ("cut", _chat_reply("x"))) as srv:
        with pytest.raises(SearchBackendError, match="IncompleteRead"):
            OpenAISimulatorBackend(srv.url, retries=1, backoff=0.01, timeout=5).search(REQS[:1])


def test_openai_backend_client_error_fails_at_once():
    with _Server(lambda p, b: (400, {"error": "bad model"})) as srv:
        backend = OpenAISimulatorBackend(srv.url, retries=3, backoff=0.01)
        with pytest.raises(SearchBackendError, match=r"rejected the request: HTTP 400.*bad model"):
            backend.search(REQS[:1])
        assert len(srv.log) == 1


def test_server_down_gives_a_clear_error_in_bounded_time():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    start = time.time()
    with pytest.raises(SearchBackendError, match=rf"127\.0\.0\.1:{port}.*failed after 3 "
                                                 r"attempts.*is the server running"):
        OpenAISimulatorBackend(url, retries=2, backoff=0.01, timeout=2).search(REQS[:1])
    with pytest.raises(SearchBackendError, match=r"retriever at .*/retrieve failed"):
        RetrieverBackend(url, retries=1, backoff=0.01, timeout=2).search(REQS[:1])
    assert time.time() - start < 20


def test_timeout_is_retried_then_reported():
    with _Server(lambda p, b: (time.sleep(1.0), (200, _chat_reply("late")))[1]) as srv:
        backend = OpenAISimulatorBackend(srv.url, retries=1, backoff=0.01, timeout=0.2)
        with pytest.raises(SearchBackendError, match="failed after 2 attempts"):
            backend.search(REQS[:1])


def test_retriever_backend_formats_documents():
    def handler(path, body):
        assert path == "/retrieve" and body["topk"] == 2
        return 200, {"result": [[{"document": {"contents": f"Title {q}\nText about {q}."},
                                  "score": 1.0}, {"contents": f"Other\nMore on {q}."}]
                                for q in body["queries"]]}

    with _Server(handler) as srv:
        docs = RetrieverBackend(srv.url, topk=2).search(REQS[:2])
    # Search-R1's format of retrieved passages: f"Doc {i}(Title: {title}) {text}"
    assert docs[0] == "Doc 1(Title: Title q1) Text about q1.\nDoc 2(Title: Other) More on q1."
    assert docs[1].startswith("Doc 1(Title: Title q2)")


def test_retriever_result_count_mismatch():
    with _Server(lambda p, b: (200, {"result": [[]]})) as srv:
        with pytest.raises(SearchBackendError, match="returned 1 results for 2 queries"):
            RetrieverBackend(srv.url).search(REQS[:2])
