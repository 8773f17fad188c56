"""The launch scripts that cannot run here for real: tpu_pod.sh (its DRY_RUN output) and
gpu_slurm.sbatch (with a stand-in `srun` that records its arguments); local.sh for real."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    return dict(os.environ, ZSJAX_SKIP_INSTALL="1", VIRTUAL_ENV=sys.prefix,
                PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **extra)


def _bash(args, env, timeout=120):
    return subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_tpu_pod_dry_run_creates_copies_installs_and_runs_on_all_workers():
    out = _bash(["launch/tpu_pod.sh", "configs/zerosearch.py:qwen2.5-7b-base,grpo",
                 "--workdir", "gs://b/run 1", "--config.rl.lr=2e-6"],
                _env(DRY_RUN="1", TPU_NAME="zs", ZONE="us-east5-a", ACCELERATOR="v5p-64"))
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stderr.splitlines() if x.startswith("+ gcloud")]
    assert len(lines) == 4
    assert "tpu-vm create zs --zone us-east5-a --accelerator-type v5p-64" in lines[0]
    assert all("--worker=all" in x for x in lines[1:])
    assert "tpu-vm scp" in lines[1] and "tar -xzf ~/zsjax.tar.gz" in lines[2]
    assert "pip install" in out.stderr
    for part in ("ZSJAX_CLUSTER=tpu python3 -m zsjax.train --config", "configs/zerosearch.py:qwen2.5-7b-base,grpo",
                 "gs://b/run 1", "--config.rl.lr=2e-6"):
        assert part in lines[3], part


def test_tpu_pod_needs_its_settings():
    out = _bash(["launch/tpu_pod.sh", "configs/tiny.py"], _env(DRY_RUN="1", ZONE="z"))
    assert out.returncode != 0 and "set TPU_NAME" in out.stderr


def test_gpu_slurm_runs_zsjax_train_through_srun(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun_args"
    (bin_dir / "srun").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    (bin_dir / "srun").chmod(0o755)
    env = _env(SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="7")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    out = _bash(["launch/gpu_slurm.sbatch", "configs/tiny.py", "runs/x",
                 "--config.rl.lr=1e-6"], env)
    assert out.returncode == 0, out.stderr
    assert record.read_text().split() == [
        "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-u", "-m", "zsjax.train",
        "--config", "configs/tiny.py", "--workdir", "runs/x", "--config.rl.lr=1e-6"]
    usage = _bash(["launch/gpu_slurm.sbatch"], env)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_local_sh_runs_zsjax_train():
    out = _bash(["launch/local.sh", "--helpshort"], _env())
    assert out.returncode == 0, out.stderr
    assert "--coordinator_address" in out.stdout + out.stderr


def test_cluster_detection(monkeypatch):
    from zsjax import distributed
    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.detected_cluster() is None
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.detected_cluster() is None  # a one-task job is one process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.detected_cluster() == "slurm"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1")
    assert distributed.detected_cluster() is None  # a single-host slice
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
    assert distributed.detected_cluster() == "tpu"
    monkeypatch.setenv("ZSJAX_CLUSTER", "slurm")  # named outright
    assert distributed.detected_cluster() == "slurm"
    monkeypatch.setenv("ZSJAX_CLUSTER", "k8s")
    with pytest.raises(ValueError, match="ZSJAX_CLUSTER"):
        distributed.detected_cluster()


def test_slurm_gives_one_task_per_node_all_its_gpus(monkeypatch):
    from zsjax import distributed
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
    assert distributed.slurm_local_device_ids() == list(range(8))
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")  # one task per GPU: JAX's own default
    assert distributed.slurm_local_device_ids() is None
    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    assert distributed.slurm_local_device_ids() is None
