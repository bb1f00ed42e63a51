"""End to end through the launchers: train, resume after SIGKILL, two msrun workers, infer, bad input.

These run the real ``run_train.sh`` / ``run_infer.sh`` on ``configs/tiny.yaml``
(a 16×16 GLIDE on the demo set), so they also check the launchers' set-up.
"""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mind_diffusion.checkpoints import list_checkpoints, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/tiny.yaml"
ENV = dict(os.environ, PYTHONUNBUFFERED="1", GLOG_v="3", PY=sys.executable)


def launch(*args, check=True, timeout=600):
    result = subprocess.run(["bash", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def state_arrays(path):
    checkpoint = read_checkpoint(path)
    return {name: value.asnumpy() for name, value in checkpoint.items() if name not in ("config",)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("tiny"))
    result = launch("run_train.sh", "1", TINY, "--run-dir", run_dir, "--no-progress")
    return run_dir, result


def test_train_writes_checkpoints_logs_config_and_samples(tiny_run):
    run_dir, result = tiny_run
    assert [step for step, _ in list_checkpoints(run_dir)] == [2, 4]
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))
    lines = open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8").read().splitlines()
    assert len(lines) == 4 and all('"loss_q' in line for line in lines)
    grid = os.path.join(run_dir, "samples", "step_00000004.png")
    assert os.path.exists(grid) and f"samples: {grid}" in result.stdout
    checkpoint = read_checkpoint(os.path.join(run_dir, "ckpt_00000004.ckpt"))
    names = set(checkpoint)
    assert {"step", "config", "optimizer.global_step", "loss_scale"} <= names
    assert any(n.startswith("ema_0.99.") for n in names) and any(n.startswith("optimizer.moments1.") for n in names)


def test_infer_writes_a_grid_for_chinese_and_english_prompts(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    ckpt = os.path.join(run_dir, "ckpt_00000004.ckpt")
    for prompt in ("蓝色背景上的红色圆形", "a yellow star"):
        result = launch("run_infer.sh", prompt, "--ckpt", ckpt, "--n", "2", "--steps", "3", "--out", str(tmp_path))
        path = result.stdout.strip().splitlines()[-1]
        assert path.endswith(".png") and os.path.exists(path)


@pytest.mark.parametrize("args,message", [
    (["", "--n", "1"], "give a non-empty prompt"),
    (["a red circle", "--label", "3"], "--label is for class-conditional"),
])
def test_infer_refuses_bad_requests(tiny_run, args, message):
    run_dir, _ = tiny_run
    result = launch("run_infer.sh", *args, "--ckpt", os.path.join(run_dir, "ckpt_00000004.ckpt"), check=False)
    assert result.returncode == 2 and message in result.stderr


def test_bad_checkpoints_and_configs_are_named(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    result = launch("run_infer.sh", "a red circle", "--ckpt", str(not_a_checkpoint), check=False)
    assert result.returncode == 2 and "not a readable MindSpore checkpoint" in result.stderr
    result = launch("run_train.sh", "1", TINY, "train.lrr=1", check=False)
    assert result.returncode == 2 and "train.lrr" in result.stderr and "train.lr" in result.stderr
    # A checkpoint of another model: a wider network cannot resume from it, and says which key differs.
    result = launch("run_train.sh", "1", TINY, "model.num_channels=64", "--run-dir", str(tmp_path / "wide"),
                    "--resume", os.path.join(run_dir, "ckpt_00000004.ckpt"), check=False)
    assert result.returncode == 1 and "cannot resume" in result.stderr
    assert "model.num_channels" in result.stderr and "64 here" in result.stderr
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4]  # nothing of the old run was touched


def test_sigkill_and_resume_match_an_uninterrupted_run(tmp_path):
    # With the importance sampler and dropout, so the loss history and the dropout masks must resume exactly too.
    common = [TINY, "train.total_steps=120", "train.save_every=10", "train.log_every=10",
              "diffusion.schedule_sampler=loss-second-moment", "model.dropout=0.1", "--no-progress"]
    straight = str(tmp_path / "straight")
    launch("run_train.sh", "1", *common, "--run-dir", straight)

    killed = str(tmp_path / "killed")
    process = subprocess.Popen(["bash", "run_train.sh", "1", *common, "--run-dir", killed], cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(killed, "ckpt_00000020.ckpt")):
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    left = list_checkpoints(killed)
    assert left and left[-1][0] < 120, "killed too late to test a resume"
    for _, path in left:  # every checkpoint on disk is complete and readable
        read_checkpoint(path)

    launch("run_train.sh", "1", *common, "--run-dir", killed, "--resume")
    ours, reference = state_arrays(os.path.join(killed, "ckpt_00000120.ckpt")), \
        state_arrays(os.path.join(straight, "ckpt_00000120.ckpt"))
    assert ours.keys() == reference.keys() and "schedule_sampler.loss_counts" in ours
    assert ours["schedule_sampler.loss_counts"].sum() > 0
    for name in reference:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)


def test_two_msrun_workers_stay_equal_on_different_data(tmp_path):
    log_dir = str(tmp_path / "logs")
    env = dict(ENV, LOG_DIR=log_dir, MASTER_PORT=str(8200 + os.getpid() % 500))
    # from the test's own folder: msrun's workers leave rank_<n>/ folders in the current directory
    result = subprocess.run(["bash", os.path.join(ROOT, "run_train.sh"), "2", TINY, "--run-dir", str(tmp_path / "run"),
                             "--no-progress"], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    logs = [open(os.path.join(log_dir, f"worker_{rank}.log"), encoding="utf-8", errors="replace").read()
            for rank in (0, 1)]
    assert result.returncode == 0, result.stderr[-2000:] + logs[0][-2000:] + logs[1][-2000:]
    finals = [re.search(r"\[rank (\d)\] finished at step 4: parameters sha1 (\w+), (\d+) items this session, "
                        r"data sha1 (\w+)", log) for log in logs]
    assert all(finals), logs
    (r0, params0, items0, data0), (r1, params1, items1, data1) = (m.groups() for m in finals)
    assert (r0, r1) == ("0", "1")
    assert params0 == params1, "data-parallel workers must end with identical parameters"
    assert data0 != data1 and items0 == items1 == "16", "each worker reads its own shard"


@pytest.mark.parametrize("overrides,infer_args", [
    (["model.class_cond=true", "model.num_classes=40"], ["--label", "7", "--label", "12"]),
    ([], []),
], ids=["class-conditional", "unconditional"])
def test_unet_checkpoints_sample_through_the_same_script(tmp_path, overrides, infer_args):
    run_dir = str(tmp_path / "run")
    launch("run_train.sh", "1", TINY, "model.arch=unet", "train.total_steps=2", "train.save_every=2",
           *overrides, "--run-dir", run_dir, "--no-progress")
    ckpt = os.path.join(run_dir, "ckpt_00000002.ckpt")
    result = launch("run_infer.sh", *infer_args, "--ckpt", ckpt, "--n", "2", "--steps", "3", "--out", str(tmp_path))
    assert os.path.exists(result.stdout.strip().splitlines()[-1])
    refused = launch("run_infer.sh", "a red circle", "--ckpt", ckpt, check=False)
    assert refused.returncode == 2 and "cannot follow the prompt" in refused.stderr


def test_export_keeps_one_ema_copy_and_debiasing_recovers_the_trained_weights(tmp_path):
    """After one step the EMA is r θ_0 + (1 − r) θ_1: removing the rebuilt θ_0 must give θ_1 exactly."""
    run_dir = str(tmp_path / "run")
    launch("run_train.sh", "1", TINY, "train.total_steps=1", "train.save_every=1", "--run-dir", run_dir,
           "--no-progress")
    ckpt = os.path.join(run_dir, "ckpt_00000001.ckpt")
    out = str(tmp_path / "exported.ckpt")
    subprocess.run([sys.executable, "-m", "mind_diffusion.cli.export", ckpt, out, "--debias-ema"], cwd=ROOT,
                   env=ENV, check=True, capture_output=True)
    exported, trained = state_arrays(out), state_arrays(ckpt)
    assert set(exported) == {"step"} | {n for n in trained if n.startswith("model.")}
    for name, value in exported.items():
        if name.startswith("model."):
            np.testing.assert_allclose(value, trained[name], rtol=1e-3, atol=1e-5, err_msg=name)
    result = launch("run_infer.sh", "a red circle", "--ckpt", out, "--n", "1", "--steps", "2", "--out", str(tmp_path))
    assert os.path.exists(result.stdout.strip().splitlines()[-1])


def test_a_word_level_glide_starts_from_a_byte_level_run_and_its_export_debiases(tiny_run, tmp_path):
    """``model.vocab`` gives GLIDE word and character tokens (configs/demo_vocab.txt, recorded by its project
    name); ``train.init_exclude`` starts its token embedding afresh while every other weight comes from a
    byte-level run. The export's debiasing must rebuild θ_0 from both sources (the embedding from the
    seed), so that one step's EMA r θ_0 + (1 − r) θ_1 gives back θ_1; the export samples through
    run_infer.sh."""
    run_dir, _ = tiny_run
    start = os.path.join(run_dir, "ckpt_00000004.ckpt")
    words = str(tmp_path / "words")
    result = launch("run_train.sh", "1", TINY, "model.vocab=configs/demo_vocab.txt", f"train.init_from={start}",
                    "train.init_exclude=[token_embedding]", "train.total_steps=1", "train.save_every=1",
                    "--run-dir", words, "--no-progress")
    assert "1 parameters kept at their fresh initialisation" in result.stdout + result.stderr
    assert f"weights initialised from {start}" in result.stdout + result.stderr
    ckpt = os.path.join(words, "ckpt_00000001.ckpt")
    resumed = launch("run_train.sh", "1", TINY, "model.vocab=configs/demo_vocab.txt", f"train.init_from={start}",
                     "train.init_exclude=[token_embedding]", "train.total_steps=2", "train.save_every=1",
                     "--run-dir", words, "--resume", ckpt, "--no-progress")
    assert f"resumed from {ckpt} at step 1 (its weights, optimizer and EMA replace train.init_from's)" \
        in resumed.stdout + resumed.stderr
    trained, initial = state_arrays(ckpt), state_arrays(start)
    vocab_lines = open(os.path.join(ROOT, "configs", "demo_vocab.txt"), encoding="utf-8").read().splitlines()
    assert trained["model.token_embedding.embedding_table"].shape == (len(vocab_lines), 32)
    assert initial["model.token_embedding.embedding_table"].shape == (258, 32)  # UTF-8 bytes, PAD, EOT
    from mind_diffusion.checkpoints import checkpoint_config
    assert checkpoint_config(read_checkpoint(ckpt))["model"]["vocab"] == os.path.join("configs", "demo_vocab.txt")
    out = str(tmp_path / "exported.ckpt")
    subprocess.run([sys.executable, "-m", "mind_diffusion.cli.export", ckpt, out, "--debias-ema"], cwd=ROOT,
                   env=ENV, check=True, capture_output=True)
    exported = state_arrays(out)
    for name, value in exported.items():
        if name.startswith("model."):
            np.testing.assert_allclose(value, trained[name], rtol=1e-3, atol=1e-5, err_msg=name)
    result = launch("run_infer.sh", "一个红色的圆", "--ckpt", out, "--n", "1", "--steps", "2", "--out", str(tmp_path))
    assert os.path.exists(result.stdout.strip().splitlines()[-1])
