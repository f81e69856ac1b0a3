"""Shared fixtures: the default taxonomy, a small generated marketplace, a local SparkSession."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# Test this checkout's sources even when the shared environment's editable install points at
# another checkout; subprocesses and Spark workers inherit it through PYTHONPATH.
_SRC = str(Path(__file__).resolve().parent.parent / "src")
if sys.path[0] != _SRC:
    sys.path.insert(0, _SRC)
if not os.environ.get("PYTHONPATH", "").startswith(_SRC):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from catalog_enrichment.config import (  # noqa: E402
    TINY_MODEL,
    AppConfig,
    MLflowConfig,
    SyntheticConfig,
    load_config,
    merge_layers,
)
from catalog_enrichment.contracts import Taxonomy, load_taxonomy  # noqa: E402
from catalog_enrichment.data.remote import HOSTS  # noqa: E402
from catalog_enrichment.data.synthetic import GeneratedMarketplace, generate_marketplace  # noqa: E402

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # what the predictor sets in a scoring process
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers run this environment's Python

# Hypothesis: the same examples on every run (a failure is a reason, never a draw), no database
# written into the checkout.
settings.register_profile("catalog-enrichment", derandomize=True, database=None, print_blob=True)
settings.load_profile("catalog-enrichment")

# A marketplace big enough for rates to be measured to a few points, small enough to make in ~2 s.
MARKETPLACE = SyntheticConfig(products=2400, seed=7, bad_rate=0.08, label_noise=0.05, days=4)


def tiny_config(*, fusion: str = "concat", epochs: int = 2, **sections: Any) -> AppConfig:
    """The app config with the tiny model (``config.TINY_MODEL``: hidden 32, one text layer,
    32 px images; trains in seconds on a CPU); ``sections`` override anything (nested dicts)."""
    base = {
        "model": {**TINY_MODEL, "fusion": fusion},
        # a held-out calibration split: one training per model (tests of cross-fitting ask for it)
        "training": {"epochs": epochs, "batch_size": 32, "crossfit_folds": 0},
        # the GX checkpoint costs seconds a run: tests/test_expectations.py and the CLI runs test it
        "validation": {"great_expectations": False},
    }
    return load_config(environ={}, overrides=merge_layers(base, sections))


@pytest.fixture(scope="session")
def taxonomy() -> Taxonomy:
    return load_taxonomy()


@pytest.fixture(scope="session")
def marketplace(tmp_path_factory: pytest.TempPathFactory, taxonomy: Taxonomy) -> GeneratedMarketplace:
    """A seeded Delta marketplace with every kind of bad row and 5 % label noise (read-only!)."""
    return generate_marketplace(tmp_path_factory.mktemp("marketplace"), MARKETPLACE, taxonomy=taxonomy)


@pytest.fixture(scope="session")
def spark(pg_server: Any) -> Iterator[object]:
    """A local SparkSession (2 threads, no UI) as the job's runtime builds it; only tests marked
    ``spark`` use it. Built with the test server's DSN in the environment, as a postgres job's is:
    its executors get the password in their environment, never in a task."""
    from catalog_enrichment import runtime
    from catalog_enrichment.catalog.postgres import PG_DSN_ENV

    cfg = AppConfig(
        spark={
            "master": "local[2]",
            "app_name": "catalog-enrichment-tests",
            "arrow_max_records_per_batch": 256,
            "conf": {"spark.sql.execution.arrow.pyspark.enabled": "true", "spark.driver.memory": "1g"},
        },
        catalog={"kind": "postgres"},  # the JDBC driver on the classpath, for the postgres tests
    )
    before = os.environ.get(PG_DSN_ENV)
    os.environ[PG_DSN_ENV] = pg_server.dsn()
    try:
        session = runtime.spark_session(cfg)
    finally:
        if before is None:
            os.environ.pop(PG_DSN_ENV)
        else:
            os.environ[PG_DSN_ENV] = before
    _SPARK_CONF.update(session=session, baseline=dict(session.conf.getAll))
    yield session
    _SPARK_CONF.clear()
    session.stop()


# The session's runtime SQL settings as the fixture built them: a job run in the test's process
# (``cli.main``) builds its session with ``getOrCreate``, which applies its own config's settings
# (e.g. the Arrow batch size) to this shared session; they are put back after each test.
_SPARK_CONF: dict[str, Any] = {}


def _restore_spark_conf() -> None:
    if not _SPARK_CONF:
        return
    conf, baseline = _SPARK_CONF["session"].conf, _SPARK_CONF["baseline"]
    for key, value in dict(conf.getAll).items():
        if key not in baseline:
            conf.unset(key)
        elif value != baseline[key]:
            conf.set(key, baseline[key])


# The model the enrichment tests score with: the tiny model trained long enough on 32-px products to
# have thresholds for several values of every attribute (about a minute on the 2-core machine).
SCORING_TRAIN = SyntheticConfig(products=3000, seed=1, image_size=32)
# Incoming products for the enrichment tests: same image size as the training data, every kind of
# bad row (4 % -> 12 of each of 8 kinds), merchant values on 20 % of the products.
INCOMING = SyntheticConfig(products=2400, seed=7, bad_rate=0.04, image_size=32, days=4)
# The Spark master of the whole job processes the fault tests start (a kill, a lock race, a dead
# server, a scheduler): one task slot, so one Python worker imports torch and loads the model, not
# two. Their subject is what survives the fault; the suite's own session (local[2]) and the
# standalone cluster run the job on several workers.
ONE_CORE_MASTER = "local[1]"
ONE_CORE = f"spark.master={ONE_CORE_MASTER}"


def run_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every xdist worker of this run sees (the run's base temp; a run without workers
    has its own)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def scoring_bundle(tmp_path_factory: pytest.TempPathFactory, taxonomy: Taxonomy) -> Path:
    """A trained, calibrated model bundle folder (read-only!) with thresholds for several values of
    every attribute, trained once per run (:func:`shared_bundle`)."""
    return shared_bundle(tmp_path_factory, taxonomy, "scoring-model", SCORING_TRAIN, epochs=6)


# A bundle for tests of what a bundle is, loads and scores (not what it writes): seconds to train.
QUICK_TRAIN = SyntheticConfig(products=600, seed=1, image_size=32)


@pytest.fixture(scope="session")
def quick_bundle(tmp_path_factory: pytest.TempPathFactory, taxonomy: Taxonomy) -> Path:
    """A trained, calibrated model bundle folder (read-only!) of one epoch on 600 products: a real
    version to load, score and refuse, not one that writes much."""
    return shared_bundle(tmp_path_factory, taxonomy, "quick-model", QUICK_TRAIN, epochs=1)


def shared_bundle(
    tmp_path_factory: pytest.TempPathFactory,
    taxonomy: Taxonomy,
    name: str,
    market: SyntheticConfig,
    epochs: int,
) -> Path:
    """The tiny model trained on ``market`` saved as a bundle folder once per run: the first worker to
    ask trains it, the others wait on a file lock and read the same folder."""
    from filelock import FileLock

    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.training.pipeline import train

    shared = run_shared_dir(tmp_path_factory)
    bundle = shared / name / "tiny-v1"
    with FileLock(shared / f"{name}.lock"):
        if not bundle.is_dir():
            root = tmp_path_factory.mktemp(f"{name}-build")
            products = generate_marketplace(root / "train", market, taxonomy=taxonomy).products
            trained = train(read_table(products), taxonomy, tiny_config(epochs=epochs))
            bundle.parent.mkdir(exist_ok=True)
            save_trained(trained, root / "tiny-v1").rename(bundle)  # whole, or not there
    return bundle


def save_trained(trained: Any, path: Path) -> Path:
    """A trained model (``training.trained.TrainedModel``) saved as a bundle folder."""
    from catalog_enrichment.inference.bundle import save_bundle

    return save_bundle(path, trained.bundle())


def save_with_model(bundle: Any, model: Any, path: Path) -> Path:
    """``bundle`` (a loaded ``ModelBundle``) saved at ``path`` with ``model`` in place of its own."""
    from catalog_enrichment.inference.bundle import save_bundle

    return save_bundle(path, dataclasses.replace(bundle, model=model, evaluation={}))


@pytest.fixture(scope="session")
def incoming(tmp_path_factory: pytest.TempPathFactory, taxonomy: Taxonomy) -> GeneratedMarketplace:
    """Incoming products with ground truth and every kind of bad row (read-only!)."""
    return generate_marketplace(tmp_path_factory.mktemp("incoming"), INCOMING, taxonomy=taxonomy)


def register_bundle(
    client: Any, bundle: Path, incoming: GeneratedMarketplace, *, name: str, artifacts: Path | None
) -> Any:
    """Register a bundle folder as a new version of ``name`` (alias challenger) in MLflow; its
    artifacts under ``artifacts`` (None: where the tracking server puts them)."""
    from catalog_enrichment import registry
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.inference.bundle import load_bundle
    from catalog_enrichment.inference.predictor import BatchPredictor

    frame = read_table(incoming.products).slice(0, 2).select(["product_id", "title", "description", "image"])
    frame = frame.to_pandas()
    mlflow_cfg = MLflowConfig(
        registered_model=name,
        experiment="training",
        artifact_location=None if artifacts is None else str(artifacts),
    )
    example = (frame, BatchPredictor(load_bundle(bundle)).score_frame(frame))
    return registry.log_and_register(client, mlflow_cfg, bundle, registry.TrainingRecord(), example, {})


def tiny_registry(
    tmp: Path, bundle: Path, incoming: GeneratedMarketplace, *, champion: bool = True
) -> tuple[Any, str, str, list[str]]:
    """A SQLite MLflow store under ``tmp`` with ``bundle`` registered as model ``tiny`` (and made
    champion). Returns (client, tracking URI, version, the CLI flags that run the job against it)."""
    from catalog_enrichment import registry

    uri = mlflow_store(tmp / "mlflow.db")
    client = registry.configure_mlflow(uri)
    version = register_bundle(client, bundle, incoming, name="tiny", artifacts=tmp / "artifacts").version
    if champion:
        registry.set_alias(client, "tiny", "champion", version)
    flags = [
        "--products", str(incoming.products),
        "--set", f"mlflow.tracking_uri={uri}",
        "--set", "mlflow.registered_model=tiny",
        "--set", "inference.device=cpu",
    ]  # fmt: skip
    return client, uri, version, flags


@contextlib.contextmanager
def environment_and_logging_restored() -> Iterator[None]:
    """The environment, the loggers' levels and handlers and the log record factory put back on
    leaving (MLflow, Great Expectations and the CLI's ``configure_logging`` set them)."""
    import logging

    def loggers() -> dict[logging.Logger, tuple[int, list[logging.Handler], dict[logging.Handler, int]]]:
        named = list(logging.root.manager.loggerDict.values())
        return {
            lg: (lg.level, list(lg.handlers), {h: h.level for h in lg.handlers})
            for lg in [logging.getLogger(), *named]
            if isinstance(lg, logging.Logger)
        }

    env, logs, factory = dict(os.environ), loggers(), logging.getLogRecordFactory()
    try:
        yield
    finally:
        logging.setLogRecordFactory(factory)
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
        for lg, (level, handlers, handler_levels) in logs.items():
            if lg.level != level:  # only where it changed: each setLevel clears every logger's cache
                lg.setLevel(level)
            if lg.handlers != handlers:
                lg.handlers[:] = handlers
            for handler, handler_level in handler_levels.items():
                handler.setLevel(handler_level)


def cli_in_process(arguments: Sequence[str]) -> tuple[int, str, str]:
    """``catalog-enrich`` run by ``cli.main`` in this process (on its Spark session, if one is up):
    exit code, stdout, stderr; the environment and the loggers it sets are put back."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from catalog_enrichment.cli import main

    out, err = io.StringIO(), io.StringIO()
    with environment_and_logging_restored(), redirect_stdout(out), redirect_stderr(err):
        code = main(list(arguments))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def _global_state_restored() -> Iterator[None]:
    """Every test leaves torch's process-wide settings as it found them (asserted: a test that
    changes them must restore them); the environment, the loggers and the shared Spark session's
    runtime settings are put back and the image hosts it paused forgotten after each test (a test's own
    settings must not reach the next)."""
    import torch

    def state() -> tuple[Any, ...]:
        return (
            torch.get_num_threads(),
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        )

    before = state()
    with environment_and_logging_restored():
        yield
    _restore_spark_conf()
    HOSTS.clear()  # the image hosts a test paused
    after = state()
    assert after == before, (
        f"the test changed torch's global state (threads, deterministic): {before} -> {after}"
    )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """A throw-away PostgreSQL server (initdb + pg_ctl on a free loopback port, password login)."""
    from catalog_enrichment.catalog.pgserver import LocalPostgres

    with LocalPostgres() as server:
        yield server


_MLFLOW_TEMPLATE: dict[str, Path] = {}


# What a command left at its defaults writes relative to its working directory, which under `make
# test` is the checkout (config.py: catalog.root, mlflow.tracking_uri; MLflow's own file store; the
# bench workdir): no test may leave one there.
DEFAULT_OUTPUTS = ("lakehouse", "mlflow.db", "mlruns", "bench-quality")


@pytest.fixture(scope="session", autouse=True)
def _checkout_untouched() -> Iterator[None]:
    """Fails the run (at this worker's end) where a test wrote a default output into the working
    directory: it should have been given a path under its ``tmp_path``."""
    before = {name for name in DEFAULT_OUTPUTS if Path(name).exists()}
    yield
    left = sorted(name for name in DEFAULT_OUTPUTS if Path(name).exists() and name not in before)
    assert not left, f"a test wrote {left} into {Path.cwd()}: give it a path under its tmp_path"


@pytest.fixture(scope="session", autouse=True)
def _mlflow_template_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Where :func:`mlflow_store` keeps this test process's migrated store (made on first use)."""
    _MLFLOW_TEMPLATE["folder"] = tmp_path_factory.mktemp("mlflow-template")


def mlflow_store(db: Path) -> str:
    """The tracking URI of a new SQLite MLflow store at ``db``. MLflow migrates a new database for
    seconds; this copies one store migrated once per test process, left with no experiment, so the
    first client creates the default experiment under its own artifact root as on a new database."""
    import shutil
    import sqlite3

    template = _MLFLOW_TEMPLATE["folder"] / "mlflow.db"
    if not template.exists():
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        made = template.with_name("making.db")
        SqlAlchemyStore(f"sqlite:///{made}", str(template.parent / "artifacts")).engine.dispose()
        with contextlib.closing(sqlite3.connect(made)) as con, con:
            con.execute("DELETE FROM experiments")
        made.rename(template)
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db)
    return f"sqlite:///{db}"


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` (SQLite backend, served artifacts) on a loopback port, in a
    session of its own: stopped with its process group (its web workers too) after the test."""
    import signal
    import socket
    import subprocess
    import time

    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
        "--artifacts-destination", str(tmp_path / "server-artifacts"), "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


_schemas = iter(range(1_000_000))


@pytest.fixture
def pg_catalog_config(pg_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The catalog config of a fresh schema on the test server (its own products and attribute
    tables); the connection in ``CATALOG_ENRICH_PG_DSN`` (put back after the test)."""
    from catalog_enrichment.catalog.postgres import PG_DSN_ENV
    from catalog_enrichment.config import CatalogConfig

    monkeypatch.setenv(PG_DSN_ENV, pg_server.dsn())
    return CatalogConfig(
        kind="postgres",
        root=str(tmp_path / "staging"),
        lock_wait_seconds=30,
        postgres={"db_schema": f"test_{os.getpid()}_{next(_schemas)}"},
    )


_MAIN_FILE_SET = pytest.StashKey[bool]()


def _share_the_cores() -> None:
    """Under pytest-xdist, each worker's torch (and every process it starts, through
    ``OMP_NUM_THREADS``) gets its share of the cores: N workers each running torch on every core
    oversubscribe them, and OpenMP threads that wait for a core they share run a training several
    times slower than their share of the machine would."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_SIGTERM_BEFORE = pytest.StashKey[Any]()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_on_sigterm(config: pytest.Config) -> None:
    """SIGTERM (a CI timeout, ``kill``) interrupts the run as Ctrl-C does: pytest then tears the
    fixtures down, so the servers and clusters they own are stopped, where Python's default would
    end the process at once and leave them running (``tests/test_interrupted_run.py``)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        config.stash[_SIGTERM_BEFORE] = signal.signal(signal.SIGTERM, _interrupt)


def pytest_configure(config: pytest.Config) -> None:
    """A pytest-xdist worker runs under execnet, whose ``__main__`` has neither ``__spec__`` nor
    ``__file__``; ``pyspark.sql.connect`` (imported by Great Expectations) reads that as "running
    doctests" and calls ``sys.exit`` when grpc is missing. Name a file for the worker's
    ``__main__`` (taken back in :func:`pytest_unconfigure`). A worker gets its share of the cores
    (:func:`_share_the_cores`); SIGTERM stops the run as Ctrl-C does (:func:`_stop_on_sigterm`)."""
    _share_the_cores()
    _stop_on_sigterm(config)
    if config.getoption("write_durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_DurationWriter(), "catalog-durations")
    main = sys.modules["__main__"]
    if getattr(main, "__spec__", None) is None and not hasattr(main, "__file__"):
        main.__file__ = __file__
        config.stash[_MAIN_FILE_SET] = True


def pytest_sessionstart(session: pytest.Session) -> None:
    """The JVM class-data-sharing archive every local Spark session and job process of the run maps
    (:func:`catalog_enrichment.runtime.write_class_archive`), written once before the workers start
    when it is missing, so that no worker or job process writes it beside the others. The fast tier
    starts no JVM and skips it."""
    fast = "not spark" in (session.config.option.markexpr or "")
    if fast or hasattr(session.config, "workerinput"):
        return
    from catalog_enrichment import runtime
    from catalog_enrichment.config import SparkConfig

    runtime.write_class_archive(SparkConfig())


def pytest_unconfigure(config: pytest.Config) -> None:
    import signal

    if config.stash.get(_MAIN_FILE_SET, False):
        del sys.modules["__main__"].__file__
    if _SIGTERM_BEFORE in config.stash:
        signal.signal(signal.SIGTERM, config.stash[_SIGTERM_BEFORE])


# Each test's seconds (setup, call and teardown) in the last `make durations` run. `make test` runs
# the suite on one pytest-xdist worker per core, a module to a worker (`--dist loadscope`: its
# module-scoped fixtures are built once), the longest modules first, so that no long one starts last
# and finishes alone (:func:`pytest_collection_modifyitems`).
DURATIONS = Path(__file__).with_name("durations.json")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--write-durations",
        action="store_true",
        help=f"write each test's seconds to tests/{DURATIONS.name}, which orders the next runs' modules",
    )


class _DurationWriter:
    """``--write-durations``: adds up each test's seconds over the run (in the process that runs the
    session: pytest-xdist sends it every worker's reports) and writes them into :data:`DURATIONS`,
    replacing the entries of the tests that ran and keeping the others (a run of a few tests updates
    theirs)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.seconds:
            merged = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
            merged.update({k: round(v, 2) for k, v in self.seconds.items()})
            DURATIONS.write_text(json.dumps(dict(sorted(merged.items())), indent=0) + "\n")


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what does not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first (their tests' seconds in :data:`DURATIONS`; a test it does not list
    counts 0), each module's tests in their order. Skip ``gpu`` tests where torch sees no CUDA
    device (CI never has one)."""
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    cost: dict[Path, float] = {}
    for item in items:
        cost[item.path] = cost.get(item.path, 0.0) + known.get(item.nodeid, 0.0)
    first = {path: i for i, path in reversed(list(enumerate(item.path for item in items)))}
    items.sort(key=lambda item: (-cost[item.path], first[item.path]))
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def verdicts_only(table: Any, taxonomy: Taxonomy, every: int = 5) -> tuple[Any, set[str]]:
    """``table`` with every ``every``-th product's labels replaced by people's verdicts (the labels
    builder's ``confirmed`` / ``rejected`` columns); the ids of those products."""
    import pyarrow as pa

    people = set(range(0, table.num_rows, every))
    for attr in taxonomy:
        column = [None if i in people else v for i, v in enumerate(table[attr.name].to_pylist())]
        at = table.schema.get_field_index(attr.name)
        table = table.set_column(at, attr.name, pa.array(column, table[attr.name].type))
    kind = pa.map_(pa.string(), pa.list_(pa.string()))
    confirmed = [[("color", ["red"])] if i in people else None for i in range(table.num_rows)]
    rejected = [
        [("pattern", ["dotted"]), ("product_type", ["lamp"])] if i in people else None
        for i in range(table.num_rows)
    ]
    table = table.append_column("confirmed", pa.array(confirmed, kind))
    table = table.append_column("rejected", pa.array(rejected, kind))
    return table, {table["product_id"][i].as_py() for i in people}


def assert_trained_on_verdicts_only(trained: Any, people: set[str]) -> None:
    """Products labelled only by verdicts train or are left out (those grouped with a held-out
    variant: the synthetic marketplace's templated titles group many), none is held out, and the
    loss is a number."""
    import numpy as np

    ids = trained.product_ids
    held_out = {ids[i] for s in ("validation", "calibration", "test") for i in getattr(trained.splits, s)}
    trained_on = people & {ids[i] for i in trained.splits.train}
    assert trained_on and not people & held_out
    assert all(np.isfinite(h.train_loss) for h in trained.history)
