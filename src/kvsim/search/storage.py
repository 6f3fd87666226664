"""Where a study lives, and how the trials of a worker that died are run again.

- Embedded, one process (the default): an SQLite file `RUNDIR/study.db`.
- Embedded, `--workers K > 1` on one machine: Optuna's journal file `RUNDIR/study.journal`.
  SQLite cannot serve several writers (it has no `SELECT ... FOR UPDATE`; "database is locked"),
  while the journal's file lock is safe between processes of one host (not over NFS).
- `--storage postgresql://user:password@host:port/db`: any number of `kvsim search` processes on any
  number of machines share the study.

A RUNDIR keeps the storage it was created with: a later run finds `study.db` or `study.journal`
there and resumes it.

Dead workers. A worker tags every trial it runs with `host:pid` (`objective.WORKER_ATTR`).
- Embedded storages serve one machine, so a RUNNING trial whose tagged process no longer exists on
  this host is an orphan (a killed worker, a power cut): `retry_orphaned_trials` fails it and
  queues a copy with the same parameters.
- PostgreSQL workers may be on other machines, where no pid can be checked: they send a heartbeat
  every `heartbeat` seconds, and a trial whose heartbeat is older than twice that is failed by the
  next worker that asks for a trial, which queues a copy the same way.
Both re-queue through Optuna's `RetryHeartbeatStaleTrialCallback`, so the copy records which trial
it retries (`retried_trial_number`) and gives up after `MAX_RETRY` attempts of one configuration.
A trial that died while its parameters were being drawn is failed without a copy (`RetryDrawnTrial`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from kvsim.errors import KvsimError
from kvsim.search.objective import WORKER_ATTR
from kvsim.search.rundir import SearchRun

# `Objective` sets this user attribute once every parameter of a trial is drawn.
DRAWN_ATTR = "policy"
MAX_RETRY = 3
DEFAULT_HEARTBEAT_S = 30
_SCHEMES = ("postgresql", "sqlite")


class RetryDrawnTrial(RetryHeartbeatStaleTrialCallback):
    """Queue a copy of a dead trial only when all its parameters were drawn. A trial killed while
    drawing has a partial set; its copy would draw the rest anew and run another configuration
    under the old trial's name. Such a trial is only failed: the sampler's next trial draws afresh."""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if DRAWN_ATTR in trial.user_attrs:
            super().__call__(study, trial)


@dataclass(frozen=True)
class StorageChoice:
    """An RDB URL (SQLite or PostgreSQL) or a journal file; `open` connects to it."""

    url: str | None = None
    journal: Path | None = None
    heartbeat_s: int = DEFAULT_HEARTBEAT_S

    @property
    def embedded(self) -> bool:
        """On this machine only: dead workers are found by pid instead of heartbeat."""
        return self.journal is not None or self.url.startswith("sqlite")

    @property
    def shareable(self) -> bool:
        """Several processes may write to it at once."""
        return not (self.url or "").startswith("sqlite")

    def describe(self) -> str:
        """The storage as users pass it to optuna-dashboard, without a password."""
        if self.journal is not None:
            return str(self.journal)
        return make_url(self.url).render_as_string(hide_password=True)

    def open(self) -> optuna.storages.BaseStorage:
        if self.journal is not None:
            return JournalStorage(JournalFileBackend(str(self.journal)))
        heartbeat = {} if self.embedded else {
            "heartbeat_interval": self.heartbeat_s,
            "grace_period": 2 * self.heartbeat_s,
            "heartbeat_stale_trial_callback": RetryDrawnTrial(max_retry=MAX_RETRY),
        }
        # pre_ping: PostgreSQL servers drop connections idle for long trials (optuna#5600).
        engine = {"pool_pre_ping": True} if not self.embedded else {"connect_args": {"timeout": 30}}
        try:
            return RDBStorage(self.url, engine_kwargs=engine, **heartbeat)
        except ImportError as err:  # Optuna rewraps the driver's ModuleNotFoundError
            raise KvsimError(f"no database driver for {self.describe()}: pip install 'psycopg[binary]'") from err
        except sqlalchemy.exc.SQLAlchemyError as err:
            reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
            raise KvsimError(f"cannot open storage {self.describe()} ({reason}): check the URL, the server and the credentials") from err


def choose_storage(url: str | None, run: SearchRun, workers: int, heartbeat_s: int = DEFAULT_HEARTBEAT_S) -> StorageChoice:
    """The storage a run uses: `url` if given, else the embedded one the run folder already holds or needs."""
    if url is not None:
        choice = StorageChoice(url=_checked_url(url), heartbeat_s=heartbeat_s)
    elif run.journal_path.exists() or (workers > 1 and not run.sqlite_path.exists()):
        choice = StorageChoice(journal=run.journal_path.resolve())
    else:
        choice = StorageChoice(url=f"sqlite:///{run.sqlite_path.resolve()}")
    if workers > 1 and not choice.shareable:
        raise KvsimError(
            f"the study in {choice.describe()} is SQLite, which serves one worker: run it with --workers 1, "
            "or use a new --out (a journal file) or --storage postgresql://... for several workers"
        )
    return choice


def _checked_url(url: str) -> str:
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        parsed = None
    if parsed is None or parsed.get_backend_name() not in _SCHEMES:
        raise KvsimError(
            f"storage URL {url!r} is not supported: use postgresql://user:password@host:port/database "
            "(or sqlite:///path.db for one worker); leave --storage out for the embedded default"
        )
    return url


def retry_orphaned_trials(study: optuna.Study) -> list[int]:
    """Fail and re-queue (`RetryDrawnTrial`) the RUNNING trials of processes of this host that no longer exist.

    Only for embedded storages (one machine); returns the numbers of the trials failed.
    """
    host = socket.gethostname()
    retry = RetryDrawnTrial(max_retry=MAX_RETRY)
    orphans = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            failed = study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process finished or failed it first
        retry(study, failed)
        orphans.append(trial.number)
    return orphans


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
