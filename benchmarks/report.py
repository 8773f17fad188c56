"""A benchmark's outputs: its result as JSON at OUT, and its Markdown table at OUT's stem + .md
(what `benchmarks/run.py` gathers into its report)."""

import json
import os


def write(out: str, result, lines: list[str]) -> None:
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
