"""`zsjax.serve` on loopback, checked with the official `openai` client: the same greedy text as
`zsjax.sampling.generate`, batching of concurrent requests, limits, API keys, zsjax's own
simulator backend against it, and a graceful SIGTERM."""

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import chat_tokenizer
import jax
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from zsjax import serve  # noqa: E402
from zsjax.evaluate import load_policy  # noqa: E402
from zsjax.sampling import generate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """The app on uvicorn in a thread of this process."""

    def __init__(self, model_dir, mesh=None, **kw):
        self.config, self.params, self.tok = load_policy(model_dir, mesh=mesh)
        eos = (self.tok.eos_token_id,)
        self.engine = serve.Engine(self.config, self.params, self.tok, eos,
                                   wait_s=kw.pop("wait_s", 0.2), gap_s=kw.pop("gap_s", 0.05))
        self.port = _free_port()
        app = serve.create_app(self.engine, "tiny", **kw)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, api_key="unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                             timeout=120)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return chat_tokenizer.save_tiny_model(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    s = _Server(model_dir)
    yield s
    s.close()


def _greedy(s, ids, max_tokens):
    out = generate(s.config, s.params, [ids], max_new_tokens=max_tokens, tokenizer=s.tok,
                   eos_token_ids=(s.tok.eos_token_id,))
    tokens = out.tokens[0]
    if out.finish_reasons[0] == "eos":
        tokens = tokens[:-1]
    return s.tok.decode(tokens, skip_special_tokens=True), out.finish_reasons[0]


def test_chat_and_completions_give_generates_greedy_text(server):
    client = server.client()
    messages = [{"role": "system", "content": ""},
                {"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="", messages=messages, temperature=0,
                                           max_tokens=12)
    text = server.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want, reason = _greedy(server, server.tok.encode(text, add_special_tokens=False), 12)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == ("length" if reason == "length" else "stop")
    assert reply.usage.completion_tokens >= 1

    done = client.completions.create(model="tiny", prompt="Doc 1: Vex is", temperature=0,
                                     max_tokens=9)
    assert done.choices[0].text == _greedy(server, server.tok.encode("Doc 1: Vex is"), 9)[0]
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_sampling_parameters(server):
    client = server.client()

    def ask(**kw):
        kw.setdefault("max_tokens", 16)
        return client.completions.create(model="", prompt="The Qux river", **kw)
    a = ask(temperature=1.0, seed=7, n=3)
    assert len(a.choices) == 3 and len({c.text for c in a.choices}) > 1  # own draws per choice
    assert [c.text for c in ask(temperature=1.0, seed=7, n=3).choices] == \
        [c.text for c in a.choices]  # a seed reproduces
    assert [c.text for c in ask(temperature=1.0, seed=8, n=3).choices] != \
        [c.text for c in a.choices]
    assert len(ask(temperature=0, max_tokens=3).choices[0].text) > 0
    free = ask(temperature=0).choices[0].text
    stop = free[3:6]
    cut = ask(temperature=0, stop=[stop]).choices[0]
    assert cut.text == free[:free.find(stop)] and cut.finish_reason == "stop"


def test_concurrent_requests_are_batched(model_dir):
    s = _Server(model_dir, wait_s=2.0, gap_s=0.5)
    try:
        client = s.client()
        prompts = [f"Doc {i}: Mira Tal was born in" for i in range(32)]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda p: client.completions.create(
                model="", prompt=p, temperature=0, max_tokens=6), prompts))
        for p, r in zip(prompts, replies):
            assert r.choices[0].text == _greedy(s, s.tok.encode(p), 6)[0]
        stats = json.load(urllib.request.urlopen(s.url + "/stats"))
        assert stats["requests"] == 32 and stats["sampler_calls"] < 32, stats
    finally:
        s.close()


def _post(url, body: bytes, headers=None):
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server):
    url = server.url + "/v1/completions"
    cases = [(b"{not json", 422), (json.dumps({"prompt": "x", "max_tokens": 99999}).encode(), 400),
             (json.dumps({"prompt": "x", "n": 100}).encode(), 400),
             (json.dumps({"prompt": "x", "temperature": -1}).encode(), 422),
             (json.dumps({"max_tokens": 3}).encode(), 422)]
    for body, status in cases:
        got, reply = _post(url, body)
        assert got == status and reply["error"]["message"], (body[:40], got, reply)
    got, reply = _post(server.url + "/v1/chat/completions", json.dumps({"messages": []}).encode())
    assert got == 422
    # a body over --max-request-bytes is refused from its headers, before it is read
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2_000_000))
    conn.endheaders()
    reply = conn.getresponse()
    assert reply.status == 413 and "bytes" in json.load(reply)["error"]["message"]
    conn.close()
    assert _post(url, json.dumps({"prompt": "x", "max_tokens": 2}).encode())[0] == 200


def test_tensor_parallel_serving_gives_the_same_text(model_dir, server):
    """--tensor 2 (on 2 of the test's fake CPU devices): the weights are sharded over heads
    and the MLP, and greedy text is the single-device server's."""
    from zsjax import sharding
    s = _Server(model_dir, mesh=sharding.mesh_from_config(1, 1, 2))
    try:
        assert any(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(s.params))
        ask = dict(model="", prompt="Doc 1: Vex is the capital", temperature=0, max_tokens=12)
        assert (s.client().completions.create(**ask).choices[0].text
                == server.client().completions.create(**ask).choices[0].text)
    finally:
        s.close()


def test_api_key(model_dir):
    s = _Server(model_dir, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").completions.create(model="", prompt="x", max_tokens=2)
        assert s.client("sekret").completions.create(model="", prompt="x", max_tokens=2)
        assert json.load(urllib.request.urlopen(s.url + "/health")) == {"status": "ok"}
    finally:
        s.close()


def test_zsjax_simulator_backend_against_the_server(server):
    """`backend.kind=simulator_url` (the reference's ask_llm request: chat completions, an
    empty system message, no model name needed) gets what the in-process simulator writes."""
    from zsjax.search import SearchRequest
    from zsjax.search.http_backends import OpenAISimulatorBackend
    from zsjax.search.simulator import InProcessSimulator
    reqs = [SearchRequest("capital of Zorland", "What is the capital of Zorland?", ("Vex",)),
            SearchRequest("Mira Tal", "Where was Mira Tal born?", ("Oskel",), noisy=True)]
    remote = OpenAISimulatorBackend(server.url, temperature=0.0, max_new_tokens=20,
                                    top_k_docs=3).search(reqs)
    local = InProcessSimulator(server.config, server.params, server.tok, temperature=0.0,
                               max_new_tokens=20, top_k_docs=3,
                               eos_token_ids=(server.tok.eos_token_id,)).search(reqs)
    assert remote == local

    # a whole rollout through the server: a scripted policy searches, then answers
    import numpy as np
    from zsjax.sampling import GenerateResult
    from zsjax.search import RolloutSettings, rollout

    def policy(inputs):
        texts = {0: "<search> capital of Zorland </search>", 1: "<answer> Vex </answer>"}
        ids = [server.tok.encode(texts[inputs.turn], add_special_tokens=False)
               for _ in inputs.contexts]
        lps = [np.zeros(len(x)) for x in ids]
        return GenerateResult(ids, lps, lps, ["stop"] * len(ids))

    def run(backend):
        return rollout(["What is the capital of Zorland?"], [["Vex"]], tokenizer=server.tok,
                       generate_fn=policy, backend=backend,
                       settings=RolloutSettings(max_turns=2, max_response_tokens=16))[0]
    served = run(OpenAISimulatorBackend(server.url, temperature=0.0, max_new_tokens=20,
                                        top_k_docs=3))
    assert served.num_searches == 1 and served.answer == "Vex"
    assert served.documents == [local[0]]
    assert served.token_ids == run(InProcessSimulator(
        server.config, server.params, server.tok, temperature=0.0, max_new_tokens=20,
        top_k_docs=3, eos_token_ids=(server.tok.eos_token_id,))).token_ids


def test_cli_serves_and_stops_on_sigterm(model_dir):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "zsjax.serve", "--model", model_dir,
                             "--port", str(port)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
        assert client.completions.create(model="", prompt="Doc 1:", max_tokens=3).choices
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "[serve] stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_bad_model_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "zsjax.serve", "--model", "/no/such/model"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in proc.stderr
