"""MLflow tracking: where runs live, how they are named, tagged and filled (DESIGN.md §5).

Default store: ``sqlite:///<home>/mlflow.db`` with artifacts under ``<home>/mlartifacts``,
``<home>`` = ``$LMGEN_HOME`` or ``./lmgen-runs``. ``tracking.uri`` or
``$MLFLOW_TRACKING_URI`` point at a real ``mlflow server`` instead. Only rank 0 logs.

Every client comes from ``tracking_client``: an SQLite store is created (or migrated) by one
process at a time, under a lock beside it, so runs started together on a fresh home do not
race MLflow's migration. Tag values go into MLflow filter strings through ``filter_literal``,
and each match is checked in Python too, so a sweep named ``it's`` finds its runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lmgen.concurrency import file_lock
from lmgen.config import flatten
from lmgen.paths import check_writable

log = logging.getLogger(__name__)

PARAM_VALUE_LIMIT = 6000  # MLflow's limit on one param value
# MLflow 3's UI opens an experiment by its kind: tagged as model training it lands on the runs
# table, not on the GenAI traces page (which an untagged experiment of LM runs can be taken for).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
BATCH_LIMIT = 100  # MLflow's limit on params per log_batch call
SEARCH_PAGE = 1000  # runs per search_runs page
INPUT_TRIES = 4  # log_inputs against the SQL store's race between two runs logging one dataset


def home_path() -> Path:
    """``$LMGEN_HOME`` or ``./lmgen-runs``, absolute; not created."""
    return Path(os.environ.get("LMGEN_HOME", "lmgen-runs")).resolve()
MODEL_TRAINING_VIEW = "workflowType=machine_learning"  # the UI's query for its model-training (not GenAI) view
DESCRIPTION_TAG, TAG_VALUE_LIMIT = "mlflow.note.content", 8000  # a run's description; MLflow's limit on a tag


def lmgen_home() -> Path:
    """``home_path()``, created on first use."""
    home = home_path()
    home.mkdir(parents=True, exist_ok=True)
    return home


def writable_home() -> Path:
    """``home_path()``, created if missing, once a file could be written there; ValueError naming
    ``LMGEN_HOME`` and the path otherwise (``lmgen run`` and ``lmgen sweep`` check it first)."""
    return check_writable(home_path())


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else the embedded SQLite store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{lmgen_home() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` URI, else None."""
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def tracking_client(uri: str) -> MlflowClient:
    """``MlflowClient`` on ``uri``. Creating one creates or migrates an SQLite store, which two
    processes must not do at once (the second fails in alembic with "table ... already
    exists"): it happens under an exclusive lock on ``<db>.lock``. A store in a read-only
    folder is opened unlocked (it cannot be created or migrated there anyway)."""
    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    with file_lock(db.with_name(db.name + ".lock"), optional=True):
        return MlflowClient(tracking_uri=uri)


def filter_literal(value: str) -> str | None:
    """``value`` as a string literal of an MLflow filter string, or None where the grammar has
    none. MLflow keeps what lies between the quotes verbatim (no escape sequences: ``'it''s'``
    would search for ``it''s``), so the literal takes the quote ``value`` does not hold; the
    filter's tokenizer (sqlparse) reads a backslash before the closing quote as escaping it, so
    a value ending in a backslash, or holding both quotes, has no literal."""
    if value.endswith("\\"):
        return None
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    return None


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any compute) when a tracking server cannot be reached."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as reply:
            if reply.status != 200:
                raise ConnectionError(f"status {reply.status}")
    except (OSError, urllib.error.URLError, ConnectionError) as err:
        raise ConnectionError(f"MLflow tracking server {uri} is unreachable ({err}); "
                              "start it or unset tracking.uri / MLFLOW_TRACKING_URI") from None


def git_sha() -> str:
    """Commit of the lmgen source tree (suffix ``-dirty`` with local changes), or ``unknown``."""
    src = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


class Tracker:
    """A thin, typed wrapper over ``MlflowClient`` for one experiment.

    ``writes=False`` (what non-zero ranks get): reads work, every write is a no-op, and
    ``start_run`` hands back a placeholder id, so a distributed run logs exactly one run.
    """

    def __init__(self, uri: str, experiment: str, writes: bool = True) -> None:
        self.uri = uri
        self.writes = writes
        self.client = tracking_client(uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment = experiment
        if found is not None:
            self.experiment_id = found.experiment_id
            if writes and found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:  # made by an older lmgen
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        elif not writes:
            self.experiment_id = None  # rank 0 creates it; a reader has nothing to find yet
        else:
            location = None
            if uri.startswith("sqlite:///"):  # keep artifacts beside the embedded store
                location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / experiment).as_uri()
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location,
                                                                   tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
            except MlflowException as err:  # another process created it since we looked
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                self.experiment_id = self.client.get_experiment_by_name(experiment).experiment_id

    def start_run(self, run_name: str, tags: Mapping[str, str]) -> str:
        """Create a RUNNING run with the standard tags; returns its id."""
        if not self.writes:
            return f"rank-{os.getpid()}-{run_name}"
        sha = git_sha()
        all_tags = {"lmgen.git_sha": sha, **tags}
        if sha != "unknown":  # the Source column's commit (a dirty tree's is the commit it started from)
            all_tags["mlflow.source.git.commit"] = sha.removesuffix("-dirty")
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        return run.info.run_id

    def find_run(self, tags: Mapping[str, str], status: str | None = None) -> str | None:
        """Id of the newest run of this experiment carrying all ``tags`` (and ``status``, if given)."""
        found = self._search(tags, status, newest_only=True)
        return found[0] if found else None

    def find_runs(self, tags: Mapping[str, str], status: str) -> list[str]:
        """Ids of every run of this experiment carrying all ``tags`` with ``status``."""
        return self._search(tags, status)

    def _search(self, tags: Mapping[str, str], status: str | None, newest_only: bool = False) -> list[str]:
        """Ids of this experiment's runs carrying exactly ``tags`` (and ``status``), newest first.
        Each tag with a ``filter_literal`` narrows the search in the store; every match is then
        checked here, value for value, so a value the filter grammar cannot write is found too."""
        if self.experiment_id is None:
            return []
        literals = {key: filter_literal(str(value)) for key, value in tags.items()}
        clauses = [f"tags.`{key}` = {literal}" for key, literal in literals.items() if literal is not None]
        clauses += [f"attributes.status = '{status}'"] if status else []
        exact = None not in literals.values()
        found, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], " and ".join(clauses),
                                           order_by=["attributes.start_time DESC"],
                                           max_results=1 if newest_only and exact else SEARCH_PAGE, page_token=token)
            found += [r.info.run_id for r in page if all(r.data.tags.get(k) == str(v) for k, v in tags.items())]
            token = page.token
            if not token or (newest_only and found):
                return found[:1] if newest_only else found

    def reconcile(self, tags: Mapping[str, str]) -> list[str]:
        """End as KILLED the RUNNING runs carrying ``tags`` whose process is gone (a SIGKILL, an
        out-of-memory kill, a lost machine) — on this host, where that can be checked; returns
        their ids. A run owned by a live process, or by another host, is left alone."""
        stale = []
        for run_id in self.find_runs(tags, "RUNNING"):
            if self.end_if_abandoned(run_id, "KILLED"):
                stale.append(run_id)
        return stale

    def end_if_abandoned(self, run_id: str, status: str) -> bool:
        """End RUNNING run ``run_id`` as ``status`` (tag ``lmgen.reconciled``) when the process that
        ran it is gone — the one check every path that ends a run on another process's behalf goes
        through (a rerun's reconcile, a sweep whose point process died). A run still owned by a
        live process, one of another host (which this host cannot check) and one that is not
        RUNNING are left alone; returns whether the run was ended."""
        run = self.client.get_run(run_id)
        owner = run_owner(run.data.tags)
        if run.info.status != "RUNNING" or owner.host != socket.gethostname() or owner.alive():
            return False
        if self.writes:
            self.client.set_tag(run_id, "lmgen.reconciled", f"RUNNING but {owner} was gone")
            self.client.set_terminated(run_id, status=status)
        return True

    def live_owner(self, run_id: str) -> str | None:
        """"process P on HOST" if run ``run_id`` is RUNNING in another live process on this host, else None."""
        run = self.client.get_run(run_id)
        owner = run_owner(run.data.tags)
        mine = owner.host == socket.gethostname()
        if run.info.status != "RUNNING" or not mine or owner.pid == os.getpid() or not owner.alive():
            return None
        return str(owner)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        if self.writes:
            for key, value in tags.items():
                self.client.set_tag(run_id, key, str(value)[:PARAM_VALUE_LIMIT])

    @contextlib.contextmanager
    def ending(self, run_id: str) -> Iterator[None]:
        """End ``run_id`` as the block ends, never leaving it RUNNING: KILLED when it was stopped
        (Ctrl-C; SIGTERM, which raises SystemExit), FAILED with tag ``lmgen.error`` when it
        raised, FINISHED otherwise. The exception goes on."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            self._end_anyway(run_id, "KILLED", {})
            raise
        except BaseException as err:
            self._end_anyway(run_id, "FAILED", {"lmgen.error": f"{type(err).__name__}: {err}"})
            raise
        self.end_run(run_id, "FINISHED")

    def _end_anyway(self, run_id: str, status: str, tags: Mapping[str, str]) -> None:
        """End ``run_id`` as ``status`` with ``tags`` while an exception is on its way out; if the
        store cannot take it (the disk that filled up holds ``mlflow.db`` too), say so in the log
        and let that exception, the cause, go on."""
        try:
            self.set_tags(run_id, tags)
            self.end_run(run_id, status)
        except Exception as err:
            log.warning("run %s could not be marked %s in %s (%s: %s)", run_id, status, self.uri,
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")

    def find_finished(self, tags: Mapping[str, str]) -> str | None:
        """Id of the newest FINISHED run of this experiment carrying all ``tags``."""
        return self.find_run(tags, "FINISHED")

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def reopen_run(self, run_id: str) -> None:
        """Mark a run RUNNING again (a sweep rerun, a resumed point)."""
        if self.writes:
            self.client.update_run(run_id, status="RUNNING")

    def log_config(self, run_id: str, config: dict[str, Any], params: Mapping[str, Any] | None = None) -> None:
        """The resolved config as ``config.yaml`` (all of it) and ``params``: what the runs table
        shows of it (``lmgen.run_page``); None logs the whole config flattened."""
        if not self.writes:
            return
        import yaml

        self.log_params(run_id, flatten(config) if params is None else params)
        self.client.log_text(run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        if not self.writes:
            return
        batch = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for start in range(0, len(batch), BATCH_LIMIT):
            self.client.log_batch(run_id, params=batch[start : start + BATCH_LIMIT])

    def log_text(self, run_id: str, text: str, name: str) -> None:
        if not self.writes:
            return
        self.client.log_text(run_id, text, name)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.log_metric_values(run_id, [Metric(k, float(v), now, step) for k, v in metrics.items()])  # NaN stays

    def log_metric_values(self, run_id: str, values: list[Metric]) -> None:
        """``values`` as they are (keys, steps and timestamps), in batches MLflow accepts."""
        if not self.writes:
            return
        for start in range(0, len(values), BATCH_LIMIT * 10):
            self.client.log_batch(run_id, metrics=values[start : start + BATCH_LIMIT * 10])

    def log_image(self, run_id: str, image: np.ndarray, name: str) -> None:
        """(H, W, 3) uint8 image as a PNG artifact."""
        if not self.writes:
            return
        self.client.log_image(run_id, image, name)

    def log_animation(self, run_id: str, frames: np.ndarray, name: str, fps: float) -> None:
        """(T, H, W, 3) uint8 frames as a looping GIF artifact at ``fps`` frames per second."""
        if not self.writes:
            return
        from PIL import Image

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            first, *rest = [Image.fromarray(f) for f in frames]
            first.save(path, save_all=True, append_images=rest, duration=round(1000 / fps), loop=0, optimize=False)
            self.client.log_artifact(run_id, str(path))

    def log_file(self, run_id: str, path: Path, folder: str) -> None:
        """The file at ``path`` as artifact ``folder/<its name>``."""
        if not self.writes:
            return
        self.client.log_artifact(run_id, str(path), folder)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        if not self.writes:
            return
        self.client.set_terminated(run_id, status=status)

    def metrics(self, run_id: str) -> dict[str, float]:
        if not self.writes and run_id.startswith("rank-"):
            return {}
        return dict(self.client.get_run(run_id).data.metrics)

    def artifact_dir(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.artifact_uri

    def set_description(self, run_id: str, text: str) -> None:
        """The run's description (markdown; the UI's Description column shows its first line)."""
        if self.writes:
            self.client.set_tag(run_id, DESCRIPTION_TAG, text[:TAG_VALUE_LIMIT])

    def log_inputs(self, run_id: str, inputs: list) -> None:
        """``mlflow.entities.DatasetInput`` s of the run (the Dataset column).

        MLflow's SQL store looks a dataset up and then inserts it: two runs of one experiment
        logging the same dataset at once (a sweep's parallel points) both insert, and the second
        fails on the unique key. Tried again, it finds the row the first one wrote."""
        if not self.writes:
            return
        for attempt in range(INPUT_TRIES):
            try:
                self.client.log_inputs(run_id, datasets=inputs)
                return
            except MlflowException as err:
                if "UNIQUE constraint" not in str(err) or attempt == INPUT_TRIES - 1:
                    raise
                log.info("dataset inputs of run %s raced another run's; trying again", run_id)
                time.sleep(0.2 * (attempt + 1))

    def log_table(self, run_id: str, csv_text: str, name: str) -> None:
        """A CSV table as an MLflow table (``name``, a ``.json`` artifact the UI shows as a table)."""
        if not self.writes:
            return
        import io

        import pandas as pd

        self.client.log_table(run_id, pd.read_csv(io.StringIO(csv_text)), name)

    def log_image_at(self, run_id: str, image: np.ndarray, key: str, step: int) -> None:
        """(H, W, 3) uint8 image under ``key`` at ``step``: the run's image charts, which the
        compare view shows side by side across runs."""
        if self.writes:
            self.client.log_image(run_id, image, key=key, step=step)


def runs_table_url(base: str, experiment_id: str) -> str:
    """The MLflow UI's runs table of an experiment, in its model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_VIEW}"


def latest_experiment(uri: str, name: str | None = None) -> tuple[str, str] | None:
    """(id, name) of experiment ``name`` in the store at ``uri``, else of the one updated last
    (MLflow's empty ``Default`` only if it is all there is); None for an empty store or an
    unknown ``name``."""
    client = tracking_client(uri)
    if name is not None:
        found = client.get_experiment_by_name(name)
        return None if found is None else (found.experiment_id, found.name)
    experiments = client.search_experiments(order_by=["last_update_time DESC"])
    ours = [e for e in experiments if e.name != "Default"] or experiments
    return (ours[0].experiment_id, ours[0].name) if ours else None


def owner_tags() -> dict[str, str]:
    """Tags naming the process that runs a run: ``lmgen.host``, ``lmgen.pid`` and
    ``lmgen.pid_start`` (when it started, so a later process that reuses the pid is not taken
    for it): what ``Tracker.end_if_abandoned`` checks."""
    return {"lmgen.host": socket.gethostname(), "lmgen.pid": str(os.getpid()),
            "lmgen.pid_start": _start_time(os.getpid())}


@dataclass(frozen=True)
class RunOwner:
    """The process a run's tags name: host, pid and its start time ("" where unknown)."""

    host: str
    pid: int
    start: str

    def alive(self) -> bool:
        """Whether that very process still runs on this host: the pid exists, is no zombie, and —
        when the run recorded one — started when the run's process did (containers reuse small
        pids and hostnames, so a pid alone can name an unrelated process)."""
        return _alive(self.pid) and (not self.start or _start_time(self.pid) == self.start)

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host}"


def run_owner(tags: Mapping[str, str]) -> RunOwner:
    """The owner a run's ``owner_tags`` name."""
    return RunOwner(tags.get("lmgen.host", ""), int(tags.get("lmgen.pid", "0") or 0), tags.get("lmgen.pid_start", ""))


def _start_time(pid: int) -> str:
    """Process ``pid``'s start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), "" if unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie child counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True  # no /proc (macOS): it answered the signal


def _lines(values: list[Metric]) -> str:
    return "".join(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n"
                   for m in values)


@contextlib.contextmanager
def quick_requests(timeout: float = 5.0) -> Iterator[None]:
    """MLflow's HTTP calls in the block try once with a ``timeout``-second limit, instead of its
    default of 7 retries with exponential backoff (minutes against a dead server)."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout))}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MlflowMetricLogger(Logger):
    """Lightning logger that writes metrics into an existing MLflow run (rank 0 only).

    Unlike Lightning's ``MLFlowLogger`` it neither logs hyperparameters (the resolved config
    is already there) nor ends the run at the end of ``fit``: sampling and evaluation still
    log into the same run afterwards.

    A tracking server that stops answering does not stop training: each log call tries once,
    briefly (``quick_requests``); what fails is kept, in memory and in ``spill`` (beside the
    checkpoint), and sent with its original steps and timestamps once the server is back —
    retried at most every ``retry_every`` seconds meanwhile. At the end of fit the rest is
    sent with MLflow's full retries; what still cannot be sent stays in ``spill``, and the
    logger of a resumed run sends it first: no step's metrics are lost.
    """

    def __init__(self, tracker: Tracker, run_id: str, spill: Path | None = None, retry_every: float = 30.0) -> None:
        super().__init__()
        self.tracker, self._run_id, self.spill, self.retry_every = tracker, run_id, spill, retry_every
        self.pending: list[Metric] = []
        self._down_since: float | None = None
        self._last_try = 0.0
        if spill is not None and spill.is_file():  # left by an earlier process of this run
            self.pending = [Metric(**json.loads(line)) for line in spill.read_text().splitlines() if line.strip()]
            log.info("%d metric values a tracking outage kept in %s will be logged first", len(self.pending), spill)

    @property
    def name(self) -> str:
        return self.tracker.experiment

    @property
    def version(self) -> str:
        return self._run_id

    @property
    @rank_zero_experiment
    def experiment(self) -> MlflowClient:
        return self.tracker.client

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The config is logged once, by the caller, as flattened params."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if k != "epoch"]
        self.pending += values
        if self._down_since is None or time.monotonic() - self._last_try >= self.retry_every:
            self.flush(patient=False)
        elif self.spill is not None:  # still down, not yet time to try again: keep these on disk too
            with open(self.spill, "a") as out:
                out.write(_lines(values))

    def flush(self, patient: bool) -> bool:
        """Send what is pending; ``patient``: with MLflow's full retries. True when nothing is left."""
        if not self.pending or not self.tracker.writes:
            return True
        self._last_try = time.monotonic()
        try:
            with contextlib.nullcontext() if patient else quick_requests():
                self.tracker.log_metric_values(self._run_id, self.pending)
        except Exception as err:  # any failure of the store: keep the values, train on
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("tracking store %s did not take metrics (%s: %s); training goes on, metrics are kept "
                            "(%s) and sent when it is back", self.tracker.uri, type(err).__name__,
                            str(err).splitlines()[0][:200] if str(err) else "", self.spill or "in memory")
            self._write_spill()
            return False
        if self._down_since is not None:
            log.warning("tracking store %s is back after %.0f s: %d kept metric values logged", self.tracker.uri,
                        time.monotonic() - self._down_since, len(self.pending))
            self._down_since = None
        self.pending = []
        if self.spill is not None:
            self.spill.unlink(missing_ok=True)
        return True

    def _write_spill(self) -> None:
        if self.spill is None:
            return
        from lmgen.files import atomic_write

        with atomic_write(self.spill) as out:
            out.write(_lines(self.pending).encode())

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if not self.flush(patient=True):
            log.error("tracking store %s is still unreachable at the end of fit: %d metric values are kept in %s "
                      "and logged when the run is resumed", self.tracker.uri, len(self.pending), self.spill)


def fetch_artifact(client: MlflowClient, run_id: str, artifact: str, dst: Path) -> Path | None:
    """Artifact ``artifact`` of ``run_id`` copied to ``dst`` (atomically; kept for next time), or
    None where the run has no such artifact: how a run trained on another machine is evaluated here."""
    from mlflow.exceptions import MlflowException

    from lmgen.files import atomic_write

    folder, _, name = artifact.rpartition("/")
    if name not in {Path(a.path).name for a in client.list_artifacts(run_id, folder or None)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(client.download_artifacts(run_id, artifact, tmp))
        except (MlflowException, OSError) as err:
            log.warning("run %s: artifact %s could not be fetched: %s", run_id, artifact, err)
            return None
        with atomic_write(dst) as out, open(local, "rb") as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    log.info("run %s: fetched %s into %s", run_id, artifact, dst)
    return dst
