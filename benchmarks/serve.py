"""Serving throughput: `zsjax.serve` under concurrent clients vs the same model called directly
through `zsjax.sampling.generate`, side by side in one run.

    python benchmarks/serve.py [--model DIR] [--clients 32] [--new-tokens 64] [--repeats 2]
                               [--out FILE]

SmolLM2-135M-Instruct by default (the package fixture). Each client sends one chat request
(greedy, max_tokens = --new-tokens) through the official `openai` client, all at once, to a
server in this process (uvicorn on loopback); the direct side decodes the same prompts as one
batch. Both take one untimed round first (compilation); the best of --repeats rounds is kept.
Reports requests/s, completion tokens/s, the server's sampler calls per round, and the ratio.
"""

import argparse
import concurrent.futures
import json
import os
import socket
import sys
import threading
import time

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "Name three colours.",
             "Explain photosynthesis in one sentence.", "What is 12 times 7?",
             "Give me a synonym for happy.", "Where is Mount Everest?", "What do bees make?"]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-wait-ms", type=float, default=200.0)
    p.add_argument("--batch-gap-ms", type=float, default=20.0)
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(serve.create_app(engine, "bench"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=600,
                           max_retries=0)

    def served():
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            replies = list(pool.map(lambda m: client.chat.completions.create(
                model="", messages=m, temperature=0, max_tokens=args.new_tokens), messages))
        return sum(r.usage.completion_tokens for r in replies)

    rows = {}
    for name, fn in (("direct", direct), ("served", served)):
        fn()  # compiles
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
        rows[name] = best
    server.should_exit = True
    engine.close()
    result = {"model": os.path.basename(os.path.normpath(model)), "clients": args.clients,
              "new_tokens": args.new_tokens, **rows,
              "served_over_direct": round(rows["served"]["tokens_s"] / rows["direct"]["tokens_s"],
                                          3)}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        md = ["| path | requests/s | tokens/s | sampler calls per round | seconds |",
              "|---|---|---|---|---|"]
        for name in ("direct", "served"):
            r = rows[name]
            md.append(f"| {name} | {r['requests_s']} | {r['tokens_s']} | "
                      f"{r['sampler_calls'] if name == 'served' else 1} | {r['seconds']} |")
        md += ["", f"{args.clients} concurrent clients, {args.new_tokens} new tokens, greedy; "
               f"served / direct tokens/s: **{result['served_over_direct']}**"]
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
