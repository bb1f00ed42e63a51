"""Data-parallel runs under msrun on CPU, with faults a cluster meets: an overflow on one rank, separate
run folders per node (no shared file system), and ranks that start from different weights.

Each test launches two msrun workers of tests/helpers/dist_driver.py (configs/tiny.yaml) and must end
within a bounded time: a collective that only one rank reaches would hang until the timeout instead.
"""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "helpers", "dist_driver.py")
BOUND_S = 300  # two tiny workers take ~1 min here; a hang would run into this


def msrun(tmp_path, name, *args, port_offset=0):
    log_dir = str(tmp_path / f"logs_{name}")
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PYTHONUNBUFFERED="1", GLOG_v="3", PATH=bindir + os.pathsep + os.environ["PATH"])
    port = 8700 + (os.getpid() + port_offset) % 800
    command = [os.path.join(bindir, "msrun"), "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", f"--log_dir={log_dir}", "--join=True", "--cluster_time_out=120",
               DRIVER, *args]
    result = subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=BOUND_S)
    logs = [open(os.path.join(log_dir, f"worker_{rank}.log"), encoding="utf-8", errors="replace").read()
            for rank in (0, 1)]
    assert result.returncode == 0, result.stderr[-2000:] + logs[0][-3000:] + logs[1][-3000:]
    results = [json.loads(re.search(r"^RESULT (.*)$", log, re.M).group(1)) for log in logs]
    starts = [int(re.search(r"starting at step (\d+)", log).group(1)) for log in logs]
    return results, starts, logs


def test_an_overflow_on_one_rank_is_skipped_by_every_rank(tmp_path):
    """+inf in rank 1's batch 2: both ranks skip step 2, the loss scale halves once on both, and the
    ranks (started from different random weights) end with identical state — no hang, no divergence."""
    results, starts, _ = msrun(tmp_path, "inf", "--run-dir", str(tmp_path / "run{rank}"), "--steps", "5",
                               "--inf-at", "1:2", "--loss-scale", "1024")
    assert starts == [0, 0]
    assert [r["applied"] for r in results] == [4, 4], results  # 5 steps, step 2 skipped everywhere
    assert [r["loss_scale"] for r in results] == [512.0, 512.0], results
    assert results[0]["state"] == results[1]["state"]
    records = [json.loads(line) for line in open(tmp_path / "run0" / "metrics.jsonl", encoding="utf-8")]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 0, 0]


def test_two_nodes_without_a_shared_folder_resume_together(tmp_path):
    """Each rank has its own run folder and only rank 0's holds checkpoints (as on two nodes without a
    shared file system): on resume rank 1 still starts at rank 0's step, with rank 0's state."""
    first, starts, _ = msrun(tmp_path, "first", "--run-dir", str(tmp_path / "node{rank}"), "--steps", "4")
    assert starts == [0, 0] and first[0]["state"] == first[1]["state"]
    assert sorted(os.listdir(tmp_path / "node0")) == ["ckpt_00000002.ckpt", "ckpt_00000004.ckpt",
                                                       "config.yaml", "metrics.jsonl"]
    assert not (tmp_path / "node1").exists() or not os.listdir(tmp_path / "node1")
    second, starts, _ = msrun(tmp_path, "second", "--run-dir", str(tmp_path / "node{rank}"), "--steps", "6",
                              "--resume", port_offset=1)
    assert starts == [4, 4]
    assert second[0]["state"] == second[1]["state"]
    assert [r["applied"] for r in second] == [6, 6]
