"""Search on a real PostgreSQL server: processes that share one study, and a worker killed with
SIGKILL in the middle of a trial, whose trial another worker runs again.

The server is a throwaway cluster started for this session (Debian's `postgresql` package, which
`.ci/run` installs). Without the server binaries these tests are skipped, except under CI
(`CI=true`), where a missing server is a failure rather than a silent skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from search_helpers import constructed_traceset, kvsim

SERVER_START_S = 60


def postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda path: int(Path(path).parts[-3]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    bindir = postgres_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        reason = "PostgreSQL server binaries not found (apt-get install postgresql; .ci/run does it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    # PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user, in a
    # folder it can reach (pytest's own temporary folders are private to root).
    as_server = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="kvsim-pg-"))
    if as_server:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()

    def run(*command: str) -> None:
        subprocess.run([*as_server, *command], check=True, capture_output=True, timeout=SERVER_START_S)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "kvsim", "--auth=trust", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", str(SERVER_START_S),
            "-o", f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off", "start")
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "kvsim", "kvsim")
        yield f"postgresql://kvsim@127.0.0.1:{port}/kvsim"
    finally:
        subprocess.run([*as_server, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("constructed")
    constructed_traceset(root)
    return root


def search_args(traces, url, study, out, *extra):
    return ["search", "--traces", traces, "--budget", "0.1", "--sampler", "cmaes", "--storage", url, "--study", study,
            "--heartbeat", 1, "--validation", 0, "--test", 0, "--tier", "proxy", "--out", out, *extra]


def test_runs_on_two_machines_add_to_one_study(traces, postgres_url, tmp_path):
    # Each run stands for a machine: its own run folder, the same study on the server.
    first = kvsim(*search_args(traces, postgres_url, "shared", tmp_path / "a", "--trials", 3))
    second = kvsim(*search_args(traces, postgres_url, "shared", tmp_path / "b", "--trials", 2, "--workers", 2))
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    assert sorted(t.number for t in study.trials) == list(range(5))
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert not (tmp_path / "a" / "study.db").exists()
    assert "postgresql://kvsim@127.0.0.1" in (tmp_path / "b" / "search.json").read_text()


# A worker that runs the real objective, announces the trial, and hangs before returning it.
HANGING_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from kvsim.policies import Budget
    from kvsim.search.objective import Evaluator, Objective
    from kvsim.search.run import SearchSettings, prepare
    from kvsim.search.study import open_study

    traces, url, announce = sys.argv[1:4]
    settings = SearchSettings(traces=Path(traces), budget=Budget(0.1), rundir=Path(announce).parent, study="killed",
                              storage=url, sampler="cmaes", heartbeat_s=1, validation=0, test=0, tier="proxy")
    prepared = prepare(settings)
    study = open_study(prepared.storage, settings.study, prepared.study_settings)
    objective = Objective(Evaluator(prepared.traceset, prepared.settings.mode), prepared.split.search, settings.budget,
                          settings.objective, settings.space)

    def hangs(trial):
        objective(trial)
        Path(announce).write_text(str(trial.number))
        time.sleep(3600)

    study.optimize(hangs, n_trials=1)
""")


def test_a_worker_killed_mid_trial_has_its_trial_retried(traces, postgres_url, tmp_path):
    announce = tmp_path / "running"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = subprocess.Popen([sys.executable, "-c", HANGING_WORKER, str(traces), postgres_url, str(announce)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not announce.exists():
            assert worker.poll() is None, "the hanging worker exited early"
            assert time.monotonic() < deadline, "the hanging worker never reached its trial"
            time.sleep(0.2)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    finally:
        worker.kill()
    killed = int(announce.read_text())
    # Heartbeats every 1 s, so the trial is stale 2 s after the worker's last one.
    time.sleep(3)
    result = kvsim(*search_args(traces, postgres_url, "killed", tmp_path / "run", "--trials", 2))
    assert result.exit_code == 0, result.output

    study = optuna.load_study(study_name="killed", storage=postgres_url)
    trials = {t.number: t for t in study.trials}
    assert trials[killed].state == TrialState.FAIL
    (retry,) = [t for t in trials.values() if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[killed].params
    assert sorted(t.state.name for t in trials.values()) == ["COMPLETE", "COMPLETE", "FAIL"]
