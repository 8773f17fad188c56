"""A Hugging Face model folder with random weights of a named shape: what the speed benchmarks
run where real weights are not at hand (a lent GPU machine reaches no package index) or too big.

    python benchmarks/random_model.py --shape qwen2.5-1.5b [--tokenizer DIR] [--smoke] OUT

Shapes are the real models' config.json values (family, widths, depth, vocabulary, tying,
biases, RoPE theta); the weights are zsjax's random init (normal 0.02), saved in bfloat16.
--smoke keeps the family and flags but shrinks the widths, depth and vocabulary (a CPU check
that a script runs end to end). The tokenizer is DIR's, else a ChatML byte-level BPE trained on
the spot (`zsjax.data.bpe`), so that chat templates apply as with the real model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

SHAPES = {  # the models' own config.json values
    "smollm2-135m": dict(family="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
                         n_kv_heads=3, head_dim=64, d_ff=1536, tie_embeddings=True,
                         rope_theta=100000.0, rms_norm_eps=1e-5),
    "qwen2.5-1.5b": dict(family="qwen2", vocab_size=151936, d_model=1536, n_layers=28,
                         n_heads=12, n_kv_heads=2, head_dim=128, d_ff=8960, qkv_bias=True,
                         tie_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768),
}
SMOKE = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
             vocab_size=2048)

_TEXTS = ["What is the capital of France? Who wrote Hamlet? Where is Mount Everest?",
          "<search> capital of France </search> <answer> Paris </answer> <think> x </think>",
          "Doc 1: Paris is the capital and largest city of France, on the river Seine."]


def chat_tokenizer(vocab_size: int = 1000):
    from zsjax.data.bpe import CHATML_SPECIALS, CHATML_TEMPLATE, train_bpe
    return train_bpe(_TEXTS * 8, vocab_size=vocab_size, specials=CHATML_SPECIALS,
                     eos="<|im_end|>", pad="<|endoftext|>", extra_specials=["<|im_start|>"],
                     chat_template=CHATML_TEMPLATE)


def write(out: str, shape: str, *, tokenizer_dir: str | None = None, smoke: bool = False,
          seed: int = 0) -> str:
    """Writes the folder (skipped if `out` already holds a model); returns `out`."""
    import jax
    import transformers
    from zsjax.models import ModelConfig, init_params, save_hf
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    dims = {**SHAPES[shape], **(SMOKE if smoke else {})}
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer_dir:
            tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        else:
            tok, tokenizer_dir = chat_tokenizer(), tmp
            tok.save_pretrained(tmp)
        if len(tok) > dims["vocab_size"]:
            raise SystemExit(f"the tokenizer has {len(tok)} tokens, more than the "
                             f"{dims['vocab_size']} rows of {shape}'s embedding table")
        config = ModelConfig(**dims, eos_token_ids=(tok.eos_token_id,),
                             pad_token_id=tok.pad_token_id)
        params = init_params(config, jax.random.key(seed))
        save_hf(config, params, out, dtype="bfloat16", tokenizer_dir=tokenizer_dir)
    print(f"[random_model] {shape}{' (smoke)' if smoke else ''}: "
          f"{config.num_params() / 1e6:.1f}M params -> {out}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--tokenizer", default="")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write(args.out, args.shape, tokenizer_dir=args.tokenizer or None, smoke=args.smoke,
          seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
