"""Builds a search corpus from QA files that carry their evidence, and indexes it with BM25.

    python -m zsjax.tools.build_corpus --out corpus.jsonl train.jsonl test.jsonl

Input rows: `{question, golden_answers, evidence: [{title, text}], ...}` (HotpotQA with its
supporting sentences). Output: one passage a line, `{id, title, text}`: every distinct evidence
passage, the sentences of one title joined, an untitled sentence alone (`zsjax.data.corpus`).
The BM25 index is built beside it (`CORPUS.bm25/`), ready for `backend.kind=bm25
backend.corpus=corpus.jsonl` in `zsjax.train` and `zsjax.evaluate`, or `zsjax.infer --corpus`.
"""

from __future__ import annotations

import argparse
import sys

from zsjax.data.corpus import write_corpus
from zsjax.search.bm25 import BM25Index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zsjax.tools.build_corpus",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("qa_files", nargs="+", help="JSONL QA files whose rows carry 'evidence'")
    p.add_argument("--out", required=True, help="the corpus to write (JSONL)")
    p.add_argument("--no-index", action="store_true", help="write the corpus only")
    args = p.parse_args(argv)
    try:
        n = write_corpus(args.qa_files, args.out)
        if not args.no_index:
            BM25Index(args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{n} passages -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
