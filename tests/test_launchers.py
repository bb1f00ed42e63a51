"""The shell launchers: run_train.sh's command lines (through --dry-run), scripts/env.sh's choice of Python,
run_tests.sh's pytest check. Nothing here trains; the end-to-end runs are in test_train_e2e.py."""
import glob
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "mind_diffusion", "cli", "train.py")
LAUNCHER_ENV = ("NODE_RANK", "LOCAL_WORKER_NUM", "MASTER_ADDR", "MASTER_PORT", "BIND_CORE", "LOG_DIR",
                "CLUSTER_TIME_OUT", "ASCEND_RT_VISIBLE_DEVICES", "HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT")


def clean_env(**changes):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update({"PY": sys.executable, "GLOG_v": "3", **changes})
    return env


def dry_run(*args, cwd, **env):
    """(exit status, [environment line, command as a list], stderr) of ``run_train.sh --dry-run``."""
    result = subprocess.run(["bash", os.path.join(ROOT, "run_train.sh"), *args, "--dry-run"], cwd=cwd,
                            env=clean_env(**env), capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    return result.returncode, (lines[0], shlex.split(lines[1])) if len(lines) == 2 else None, result.stderr


def test_help_lists_the_launchers_environment_and_the_trainers_options(tmp_path):
    result = subprocess.run(["bash", os.path.join(ROOT, "run_train.sh"), "--help"], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for word in ("--dry-run", "NODE_RANK", "BIND_CORE", "ASCEND_RT_VISIBLE_DEVICES", "HCCL_CONNECT_TIMEOUT",
                 "HCCL_EXEC_TIMEOUT", "usage: run_train.sh", "--config"):
        assert word in result.stdout, word


def test_the_default_run_keeps_the_users_directory(tmp_path):
    status, (env_line, command), _ = dry_run(cwd=tmp_path)
    assert status == 0
    assert command == [sys.executable, TRAIN, "--config", "configs/demo.yaml",
                       "--set", "train.total_steps=200", "--set", "train.batch_size=32", "--set", "train.log_every=25",
                       "--set", "train.save_every=200", "--set", "train.sample_every=0", "--run-dir", "runs/demo_quick"]
    assert "HCCL_CONNECT_TIMEOUT=1200 HCCL_EXEC_TIMEOUT=3600" in env_line


def test_arguments_pass_through_and_user_timeouts_win(tmp_path):
    status, (env_line, command), _ = dry_run("1", "my.yaml", "train.lr=1e-4", "--run-dir", "out/run", cwd=tmp_path,
                                             HCCL_CONNECT_TIMEOUT="300", HCCL_EXEC_TIMEOUT="7000")
    assert status == 0
    assert command == [sys.executable, TRAIN, "--config", "my.yaml", "--set", "train.lr=1e-4", "--run-dir", "out/run"]
    assert "HCCL_CONNECT_TIMEOUT=300 HCCL_EXEC_TIMEOUT=7000" in env_line


def test_set_as_its_help_writes_it_is_passed_once(tmp_path):
    """``--set key=value`` (the trainer's --help form) beside bare overrides: each becomes one --set."""
    status, (_, command), err = dry_run("1", "my.yaml", "--set", "data.kind=latents", "train.lr=1e-4",
                                        "--run-dir", "out/a=b", cwd=tmp_path)
    assert status == 0, err
    assert command == [sys.executable, TRAIN, "--config", "my.yaml", "--set", "data.kind=latents",
                       "--set", "train.lr=1e-4", "--run-dir", "out/a=b"]


def msrun_options(command):
    assert command[:3] == [sys.executable, "-m", "mindspore.parallel.cluster.run"]
    script = command.index(TRAIN)
    return command[3:script], command[script + 1:]


def test_msrun_numbers_the_workers_unless_node_rank_is_given(tmp_path):
    _, (_, command), _ = dry_run("2", "configs/tiny.yaml", cwd=tmp_path)
    options, script_args = msrun_options(command)
    assert "--worker_num=2" in options and "--local_worker_num=2" in options
    assert not any(o.startswith("--node_rank") for o in options)
    assert "--log_dir=runs/msrun_logs" in options and "--join=True" in options
    assert script_args == ["--config", "configs/tiny.yaml"]

    _, (env_line, command), _ = dry_run("16", cwd=tmp_path, NODE_RANK="1", LOCAL_WORKER_NUM="8",
                                        MASTER_ADDR="10.0.0.1", ASCEND_RT_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    options, _ = msrun_options(command)
    assert {"--worker_num=16", "--local_worker_num=8", "--node_rank=1", "--master_addr=10.0.0.1"} <= set(options)
    assert "ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in env_line


def test_cores_are_bound_on_ascend_machines_or_when_asked(tmp_path):
    on_ascend = bool(glob.glob("/dev/davinci[0-9]*"))
    for setting, expected in [(None, on_ascend), ("true", True), ("True", True), ("false", False)]:
        env = {} if setting is None else {"BIND_CORE": setting}
        _, (_, command), _ = dry_run("2", cwd=tmp_path, **env)
        assert ("--bind_core=True" in msrun_options(command)[0]) == expected, setting


@pytest.mark.parametrize("args,env,message", [
    (["0"], {}, "N (the number of workers) must be at least 1"),
    (["8"], {"LOCAL_WORKER_NUM": "9"}, "LOCAL_WORKER_NUM=9 must be a whole number from 1 to N=8"),
    (["8"], {"LOCAL_WORKER_NUM": "4"}, "set MASTER_ADDR"),
    (["4"], {"ASCEND_RT_VISIBLE_DEVICES": "0,1"}, "4 workers on this node but ASCEND_RT_VISIBLE_DEVICES lists 2"),
    (["2"], {"ASCEND_RT_VISIBLE_DEVICES": "0,npu1"}, "must list device ids"),
    (["2"], {"NODE_RANK": "first"}, "NODE_RANK=first must be a whole number"),
    (["2"], {"BIND_CORE": "maybe"}, "BIND_CORE=maybe must be true, false or auto"),
])
def test_inconsistent_cluster_settings_are_refused_before_starting(args, env, message, tmp_path):
    status, printed, err = dry_run(*args, cwd=tmp_path, **env)
    assert status == 2 and printed is None and message in err


# ---------------------------------------------------------------------------
# scripts/env.sh and run_tests.sh
# ---------------------------------------------------------------------------

def fake_python(folder, real, log):
    """A ``python3`` on PATH that logs its arguments and runs ``real``."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "python3"
    script.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(log))}\nexec {shlex.quote(real)} "$@"\n')
    script.chmod(0o755)
    return str(script)


def source_env(tmp_path, **env):
    base = clean_env(**env)
    base.pop("PY")
    return subprocess.run(["bash", "-c", f'source {shlex.quote(os.path.join(ROOT, "scripts", "env.sh"))} '
                                         '&& echo "PY=$PY"'], cwd=tmp_path, env=base, capture_output=True,
                          text=True, timeout=300)


def test_env_uses_the_current_python_when_the_runtime_packages_import(tmp_path):
    log = tmp_path / "calls.log"
    python = fake_python(tmp_path / "bin", sys.executable, log)
    result = source_env(tmp_path, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert result.returncode == 0 and result.stdout.strip() == f"PY={python}", result.stderr
    assert "pip" not in log.read_text()


def test_env_never_builds_a_second_mindspore_beside_an_installed_one(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "tqdm.py").write_text("raise ImportError('not installed here')\n")
    log = tmp_path / "calls.log"
    python = fake_python(tmp_path / "bin", sys.executable, log)
    result = source_env(tmp_path, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", PYTHONPATH=str(blocked))
    assert result.returncode != 0 and "PY=" not in result.stdout
    assert f"{python} has MindSpore but lacks: tqdm" in result.stderr and "pip install tqdm" in result.stderr
    assert "pip" not in log.read_text() and "venv" not in log.read_text()


def test_run_tests_leaves_a_foreign_python_without_pytest_alone(tmp_path):
    log = tmp_path / "calls.log"
    foreign = tmp_path / "python"
    # An interpreter of some other environment: no pytest, prefix elsewhere; every call is logged.
    foreign.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(log))}\n'
                       'case "$*" in *sys.prefix*) echo /opt/cluster-python; exit 0 ;; esac\nexit 1\n')
    foreign.chmod(0o755)
    result = subprocess.run(["bash", os.path.join(ROOT, "run_tests.sh"), "--version"], cwd=tmp_path,
                            env=clean_env(PY=str(foreign)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"pytest is not installed for {foreign}" in result.stderr
    assert "pip" not in log.read_text()


def _run_tests_argv(tmp_path, xdist, **env):
    """The pytest arguments run_tests.sh gives a Python that has pytest (and pytest-xdist when ``xdist``)."""
    tmp_path.mkdir()
    log = tmp_path / "calls.log"
    python = tmp_path / "python"
    # Answers the two probes (import pytest, import xdist) and logs the pytest call.
    python.write_text(f'#!/bin/sh\ncase "$*" in\n  *"import xdist"*) exit {0 if xdist else 1} ;;\n'
                      f'  *"import pytest"*) exit 0 ;;\nesac\necho "$*" >> {shlex.quote(str(log))}\n')
    python.chmod(0o755)
    result = subprocess.run(["bash", os.path.join(ROOT, "run_tests.sh"), "tests/test_x.py"], cwd=tmp_path,
                            env=clean_env(PY=str(python), **env), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return log.read_text().split()


def test_run_tests_uses_two_processes_when_xdist_is_there(tmp_path):
    serial = ["-m", "pytest", "-q", "tests/test_x.py"]
    assert _run_tests_argv(tmp_path / "a", True) == ["-m", "pytest", "-q", "-n", "2", "--dist", "loadfile",
                                                     "tests/test_x.py"]
    assert _run_tests_argv(tmp_path / "b", True, MIND_DIFFUSION_TEST_WORKERS="1") == serial
    assert _run_tests_argv(tmp_path / "c", False) == serial
