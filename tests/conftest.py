"""Shared fixtures: one real ``mlflow server`` per test session, the repository paths and the shared samples."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
MLFLOW = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{tail}")


_SQLITE_TEMPLATE: list[Path] = []  # the migrated empty store of this session, once made


def copy_migrated_sqlite(db: Path) -> None:
    """Write an empty MLflow sqlite store with every schema migration applied to ``db``.

    Migrating a fresh store is most of a server's start-up (5-10 s of CPU here, 20+ s under load). The migrations
    run once per session, into a template beside the first store's folder; every later store is a copy of it, and
    the server adds its Default experiment at start as it does on a store it migrated itself.
    """
    if not _SQLITE_TEMPLATE or not _SQLITE_TEMPLATE[0].is_file():
        from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine

        template = db.parent.parent / f"mlflow-template-{os.getpid()}.db"
        partial = template.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        engine = create_sqlalchemy_engine(f"sqlite:///{partial}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        partial.replace(template)
        _SQLITE_TEMPLATE[:] = [template]
    shutil.copyfile(_SQLITE_TEMPLATE[0], db)


def start_mlflow_server(
    workdir: Path,
    backend_uri: str | None = None,
    extra: list[str] | None = None,
    port: int | None = None,
    wait: bool = True,
):
    """Start ``mlflow server`` on 127.0.0.1 at ``port`` (default: a free one); returns (process, uri, log path).

    Without ``backend_uri`` the store is ``workdir/mlflow.db`` (an existing one is reused, a new one is a copy of
    the session's migrated template). ``wait=False`` returns at once: call ``wait_http(uri + "/health", ...)``
    before using it, so that the caller can prepare other things while the server boots.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    if backend_uri is None:
        db = workdir / "mlflow.db"
        if not db.exists():
            copy_migrated_sqlite(db)
        backend_uri = f"sqlite:///{db}"
    log = workdir / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        MLFLOW,
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(workdir / "mlartifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        *(extra or []),
    ]
    proc = subprocess.Popen(
        cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    if not wait:
        return proc, uri, log
    try:
        wait_http(f"{uri}/health", timeout=120, proc=proc, log=log)
    except BaseException:
        stop_process(proc)
        raise
    return proc, uri, log


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it spawned."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait(timeout=15)


_TRACKING_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def _tracking_state() -> tuple[str | None, dict[str, str | None], str | None]:
    # MLflow keeps set_tracking_uri's value in a module global (no public getter) that outlives a test and also
    # writes it into MLFLOW_TRACKING_URI: a later test's in-process lookups would go to the earlier test's store.
    # mlflow.set_experiment keeps its experiment id in another (fluent's _active_experiment_id): a later test's
    # start_run in another store would look for that id there.
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {var: os.environ.get(var) for var in _TRACKING_ENV}
    return tracking_utils._tracking_uri, env, fluent._active_experiment_id


def _restore_tracking_state(state: tuple[str | None, dict[str, str | None], str | None]) -> None:
    import mlflow
    from mlflow.tracking import fluent

    uri, env, experiment_id = state
    while mlflow.active_run():
        mlflow.end_run()
    fluent._active_experiment_id = experiment_id
    mlflow.set_tracking_uri(uri)  # None unsets the global again
    for var, value in env.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


@contextmanager
def tracking_store(uri: str):
    """MLflow pointed at ``uri`` in this process (and, through ``MLFLOW_TRACKING_URI``, its children) with no
    inherited run; afterwards exactly the state before (open runs ended)."""
    import mlflow

    state = _tracking_state()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    for var in _TRACKING_ENV[1:]:
        os.environ.pop(var, None)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        _restore_tracking_state(state)


def new_sqlite_store(folder: Path) -> str:
    """The URI of a new sqlite store in ``folder`` whose artifacts stay in ``folder`` as well.

    A sqlite store's default artifact root is ``./mlruns`` in the working directory: the checkout, when the tests
    run from it. The store starts as a copy of the session's migrated template (:func:`copy_migrated_sqlite`) and
    gets its Default experiment here, with the artifact root in ``folder``.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    copy_migrated_sqlite(folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    SqlAlchemyStore(uri, str(folder / "mlartifacts")).engine.dispose()
    return uri


@contextmanager
def sqlite_tracking_store(folder: Path):
    """:func:`tracking_store` on :func:`new_sqlite_store` in ``folder``."""
    with tracking_store(new_sqlite_store(folder)) as uri:
        yield uri


@pytest.fixture(autouse=True)
def _keep_the_tracking_uri():
    """Undo whatever a test did to MLflow's tracking URI (see :func:`_tracking_state`)."""
    state = _tracking_state()
    yield
    _restore_tracking_state(state)


@pytest.fixture(scope="module", autouse=True)
def _keep_the_tracking_uri_per_module():
    """The same for a module's fixtures (set up before any test's autouse fixture can see what they change)."""
    state = _tracking_state()
    yield
    _restore_tracking_state(state)


# One tracking server per test session, also when pytest-xdist runs the tests in several worker processes: the first
# worker that needs it starts it (under a file lock) and writes its address into a folder the controller chose; the
# others read it, and the controller stops it once every worker is done.
_SERVER_DIR_KEY = "mlflow_server_dir"
_server_dir = pytest.StashKey[Path]()
_session_failed = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller, or a run without workers
        config.stash[_server_dir] = Path(tempfile.mkdtemp(prefix="pytest-mlflow-server-"))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # pytest-xdist: hand the folder to each worker
    node.workerinput[_SERVER_DIR_KEY] = str(node.config.stash[_server_dir])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_session_failed] = exitstatus != 0


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(_server_dir, None)
    if folder is None:
        return
    record = folder / "server.json"
    if record.is_file():
        stop_process_group(json.loads(record.read_text())["pid"])
    if config.stash.get(_session_failed, True):
        print(f"\nthe session's tracking server (store, artifacts, server.log) is kept in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child, now reaped
            return False
    except ChildProcessError:  # another process's child (a worker's server outlives the worker)
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def stop_process_group(pid: int, timeout: float = 15) -> None:
    """Stop a process group that this process may not be the parent of (a server another worker started)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _running(pid):
            break
    try:
        os.killpg(pid, signal.SIGKILL)  # whatever of the group outlived its leader
    except ProcessLookupError:
        pass


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the tracking server is end-to-end, wherever it lives: ``pytest -m "not e2e"`` starts none.

    Files with end-to-end tests run first, then integration tests, then unit tests: pytest-xdist (``--dist=loadfile
    --no-loadscope-reorder``) hands out files in this order, so the minute-long files start at once on every worker
    and the many short ones fill the end, where they balance the workers' finishing times. (xdist's default order,
    most tests first, left the end-to-end files for last: one worker ran them alone for minutes.)
    """
    for item in items:
        if "mlflow_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)
    rank: dict[Path, int] = {}
    for item in items:
        path = item.path
        folder = path.parent.name  # tests/e2e, tests/integration or tests/unit
        here = 0 if item.get_closest_marker("e2e") else 1 if folder == "integration" else 2
        rank[path] = min(rank.get(path, here), here)
    items.sort(key=lambda item: rank[item.path])  # stable: the order within a rank, and within a file, is kept


@pytest.fixture(scope="session")
def mlflow_server(request) -> str:
    """A real tracking server (sqlite + proxied artifacts) shared by the whole session, its workers included;
    yields its URI."""
    config = request.config
    folder = Path(config.workerinput[_SERVER_DIR_KEY]) if hasattr(config, "workerinput") else config.stash[_server_dir]
    record = folder / "server.json"
    with (folder / "server.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.is_file() and not _running(json.loads(record.read_text())["pid"]):
            record.unlink()  # its server is gone (killed, crashed): start another
        if not record.is_file():
            proc, uri, log = start_mlflow_server(folder / "server", wait=False)
            # Recorded before it answers, so that the controller stops it even if this worker dies meanwhile.
            record.write_text(json.dumps({"uri": uri, "pid": proc.pid}))
            try:
                wait_http(f"{uri}/health", timeout=120, proc=proc, log=log)
            except BaseException:
                stop_process(proc)
                record.unlink()
                raise
    yield json.loads(record.read_text())["uri"]


# Set by `mlflow run` for its child process; a test's own runs must not attach to an outer run.
MLFLOW_RUN_VARS = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def child_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that logs to ``tracking_uri``: no inherited run, this venv's tools first."""
    env = {key: value for key, value in os.environ.items() if key not in MLFLOW_RUN_VARS}
    env.update(
        MLFLOW_TRACKING_URI=tracking_uri, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    )
    env.update(extra)
    return env


def train_command(
    data: Path, experiment: str, overrides: str, registered_model: str = "", config: str = "configs/tiny.yaml"
) -> list[str]:
    """``python -m entrypoints.train`` as the tests start it (from the repository root, tiny recipe by default)."""
    return [
        sys.executable,
        "-m",
        "entrypoints.train",
        "--config",
        config,
        "--data",
        str(data),
        "--registered-model",
        registered_model,
        "--experiment",
        experiment,
        "--overrides",
        overrides,
    ]


def random_bn_model(num_classes: int, seed: int = 0):
    """An FC-HarDNet in eval mode with non-trivial BatchNorm statistics, so that a wrong BN fusion shows up."""
    import torch

    from segmentation.models import FCHarDNet

    torch.manual_seed(seed)
    model = FCHarDNet(num_classes=num_classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture
def tracking_uri(mlflow_server, monkeypatch) -> str:
    """Point this test's MLflow client at the session server."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for var in MLFLOW_RUN_VARS:
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real samples in ../shared/data (present in CI and on the team's machines, absent in a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared sample data not found at {SHARED_DATA} (only present beside the team's checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """5 synthetic 64x128 images (4 train, 1 val) for trainings that only read them; shared by the session."""
    from segmentation.data.preprocess import run_preprocess

    out = tmp_path_factory.mktemp("tiny_data")
    run_preprocess("synthetic", "", out, num_images=5, height=64, width=128, val_fraction=0.2)
    return out


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
PG_START_HINT = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


def make_postgres_db(prefix: str = "mlflow_test", port: int = PG_PORT) -> str:
    """Create a fresh database on the local PostgreSQL (trust auth, user postgres); returns its SQLAlchemy URI.

    Fails the test (never skips) when PostgreSQL does not answer, saying how to start it. Drop the database
    with ``drop_postgres_db(uri)`` once the servers using it are stopped.
    """
    import uuid

    try:
        socket.create_connection((PG_HOST, port), timeout=5).close()
    except OSError as exc:
        pytest.fail(f"PostgreSQL is not running on {PG_HOST}:{port} ({exc}). Start it with:\n  {PG_START_HINT}")
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}".lower()
    cmd = ["createdb", "-h", PG_HOST, "-p", str(port), "-U", PG_USER, name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        pytest.fail("`createdb` not found: install the PostgreSQL client (apt-get install postgresql-client)")
    if proc.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}\nIs PostgreSQL running? {PG_START_HINT}")
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the project's driver is psycopg2 (psycopg2-binary).
    return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{port}/{name}"


def drop_postgres_db(uri: str) -> None:
    """Drop a database made by ``make_postgres_db`` (closing any connection still open to it)."""
    host_port, name = uri.rsplit("@", 1)[1].split("/", 1)
    port = host_port.rsplit(":", 1)[1]
    subprocess.run(
        ["dropdb", "-h", PG_HOST, "-p", port, "-U", PG_USER, "--if-exists", "--force", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
