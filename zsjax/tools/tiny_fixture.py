"""Writes the tiny policy, simulator and QA fixture (`zsjax.data.tiny_fixture`) to a folder and
prints its paths as JSON.

    python -m zsjax.tools.tiny_fixture DIR
"""

from __future__ import annotations

import argparse
import json

from zsjax.data.tiny_fixture import make


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zsjax.tools.tiny_fixture",
                                     description="Writes the tiny policy, simulator and QA "
                                                 "fixture; prints its paths as JSON.")
    parser.add_argument("dir", nargs="?", default="tiny_fixture", help="output folder")
    print(json.dumps(make(parser.parse_args(argv).dir), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
