"""Multi-host training as real processes over loopback: `launch/multiprocess_cpu.sh` runs
configs/tiny.py as 2 processes x 2 fake CPU devices, and must export the policy that 1 process
x 4 fake devices does (same config, same seed). Every child runs under a timeout in its own
process group, which is killed whatever happens."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600  # seconds, per command; a run takes ~20 s on an idle 2-core machine
# fsdp over both processes: params sharded across them, so exporting the policy is a collective
ARGS = ["--config", "configs/tiny.py", "--config.mesh.data=1", "--config.mesh.fsdp=4",
        "--config.train.steps=3", "--config.train.tensorboard=False"]


def _env(devices: int | None = None) -> dict:
    env = dict(os.environ, ZSJAX_SKIP_INSTALL="1", JAX_PLATFORMS="cpu",
               VIRTUAL_ENV=sys.prefix,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _run(cmd, env, timeout=TIMEOUT, during=None) -> subprocess.CompletedProcess:
    """Runs `cmd` in a new process group and kills the whole group on the way out.
    `during(proc)`, if given, runs while the command does (to signal it, say)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        if during is not None:
            during(proc)
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = "(timed out)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _params(path):
    import jax

    from zsjax.models import load_hf
    return [np.asarray(x) for x in jax.tree.leaves(load_hf(path)[1])]


def _trajectories(workdir):
    rows = []
    for name in sorted(f for f in os.listdir(workdir) if f.startswith("trajectories")):
        rows += [json.loads(x) for x in open(os.path.join(workdir, name))]
    return sorted(((r["step"], r["question"], r["response"]) for r in rows))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("mp")
    one = _run([sys.executable, "-m", "zsjax.train", *ARGS, "--workdir", str(base / "one")],
               _env(devices=4))
    assert one.returncode == 0, one.stdout[-3000:]
    two = _run(["bash", "launch/multiprocess_cpu.sh", *ARGS, "--workdir", str(base / "two")],
               dict(_env(), NPROC="2", DEVICES="2", TIMEOUT="120"))
    assert two.returncode == 0, two.stdout[-3000:]
    return base / "one", base / "two", two.stdout


@pytest.mark.slow
def test_two_processes_export_the_one_process_policy(runs):
    one, two, _ = runs
    a, b = _params(one / "policy_hf"), _params(two / "policy_hf")
    start = _params(one / "fixture" / "policy_hf")
    moved = max(float(np.abs(x - s).max()) for x, s in zip(a, start))
    assert moved > 1e-4  # training changed the policy ...
    for x, y in zip(a, b):  # ... and both layouts changed it alike
        np.testing.assert_allclose(x, y, atol=1e-6)
    # The same trajectories were sampled, split over the two processes' files.
    assert _trajectories(one) == _trajectories(two)
    assert os.path.exists(two / "trajectories.process1.jsonl")


@pytest.mark.slow
def test_one_metrics_writer_and_a_multiprocess_checkpoint(runs):
    one, two, log = runs
    steps = [json.loads(x)["step"] for x in open(two / "metrics.jsonl")]
    assert steps == [1, 2, 3]  # written once, by process 0
    for a, b in zip(open(one / "metrics.jsonl"), open(two / "metrics.jsonl")):
        a, b = json.loads(a), json.loads(b)
        for key in ("reward_mean", "response_tokens_mean", "searches_mean", "kl", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert os.path.isdir(two / "checkpoints" / "3")
    assert "[p0]" in log and "[p1]" in log


def test_a_peer_that_never_starts_fails_clearly_and_in_time(tmp_path):
    port = _free_port()
    t0 = time.time()
    out = _run([sys.executable, "-m", "zsjax.train", *ARGS, "--workdir", str(tmp_path),
                "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                "--process_id", "0", "--initialization_timeout", "5"], _env(devices=2),
               timeout=120)
    assert out.returncode == 3, out.stdout[-2000:]
    assert "did not come up within 5 s" in out.stdout
    assert time.time() - t0 < 100


def test_incomplete_distributed_flags_are_an_input_error(tmp_path):
    out = _run([sys.executable, "-m", "zsjax.train", *ARGS, "--workdir", str(tmp_path),
                "--num_processes", "2"], _env(devices=2), timeout=120)
    assert out.returncode == 2 and "--coordinator_address HOST:PORT" in out.stdout


def test_a_training_mesh_short_of_the_devices_is_an_input_error(tmp_path):
    args = [a for a in ARGS if not a.startswith("--config.mesh")] + ["--config.mesh.data=2"]
    out = _run(["bash", "launch/multiprocess_cpu.sh", *args, "--workdir", str(tmp_path)],
               dict(_env(), NPROC="2", DEVICES="2", TIMEOUT="60"), timeout=300)
    assert out.returncode == 2, out.stdout[-2000:]
    assert "the training mesh must span all 4 devices" in out.stdout


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_one_checkpoint(tmp_path):
    """SIGTERM to process 1 only (a preempted host): both processes agree to stop after the
    same step, checkpoint it together and exit 143 (the launcher too); the same command then
    resumes from that step and finishes."""
    args = [a for a in ARGS if not a.startswith("--config.train.steps")] + [
        "--config.train.steps=8", "--config.train.checkpoint_every=100"]
    cmd = ["bash", "launch/multiprocess_cpu.sh", *args, "--workdir", str(tmp_path)]
    env = dict(_env(), NPROC="2", DEVICES="2", TIMEOUT="120")
    metrics = tmp_path / "metrics.jsonl"

    def preempt_process_1(proc):  # once a step is logged
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= 1:
                break
            time.sleep(0.1)
        subprocess.run(["pkill", "-TERM", "-f", "--", f"--workdir {tmp_path} .*--process_id 1"])

    first = _run(cmd, env, during=preempt_process_1)
    out = first.stdout
    assert first.returncode == 143, out[-3000:]
    done = len(metrics.read_text().splitlines())
    assert 1 <= done < 8
    for p in (0, 1):
        assert f"[p{p}] stopped: SIGTERM: checkpointed step {done} of 8" in out
    assert os.listdir(tmp_path / "checkpoints") == [str(done)]
    again = _run(cmd, env)
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"[p1] [train] resumed from step {done}" in again.stdout
    assert [json.loads(x)["step"] for x in open(metrics)] == list(range(1, 9))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
