"""What a job process creates: the SparkSession, the MLflow client, the torch device, the model
version it runs - and every process or JVM setting, from one table.

Only the CLI (and so ``jobs/``) calls this module (DESIGN: library code is handed a session, a
client, a device).

The settings, each with the config field that switches it:

=================================  =======================================  ==================================
setting                            why                                      switch
=================================  =======================================  ==================================
session time zone UTC              timestamps exact across machines         (always)
java.time values (Instant) for     a timestamp filter pushed to PostgreSQL  (always)
timestamps                         is written in the session's zone, not
                                   the JVM's
Python worker reuse                the model is loaded once per worker      (always)
rows per Arrow batch and per       images and stored embeddings make rows   spark.arrow_max_records_per_batch
Parquet read batch                 large (Spark's 4,096 rows of 2,000-float
                                   vectors exhaust a 1 GB heap)
Spark's console progress bar       progress on a terminal                   (stderr is a terminal)
no UI, 2 x cores shuffle           the defaults are sized for clusters      (local masters)
partitions
a failed task is tried 4 times     as on a cluster: one killed worker does  (local masters)
(``local[N]`` -> ``local[N,4]``)   not fail the night
JVM logs errors only               quiet by default (log4j2.properties)     -v, -vv (CLI flags)
JVM C1 JIT only                    Spark compiles new classes per query;    spark.c1_jit (submitted:
                                                                            deploy/spark/*.conf)
(-XX:TieredStopAtLevel=1), with a  C2 would take the scoring cores; C1
256 MB code cache                  alone gets a 48 MB cache, which a long
(-XX:ReservedCodeCacheSize)        session's queries fill (then the JIT
                                   stops and the JVM runs interpreted)
driver JVM maps its classes from   loading and verifying Spark's classes    spark.class_data_sharing
a class-data-sharing archive       from the jars is seconds of every job
(AppCDS, ``-XX:SharedArchiveFile``) start; the first session of a JDK and
                                   Spark install writes the archive
                                   (:func:`write_class_archive`)
PostgreSQL JDBC driver             the postgres catalog's reads             catalog.postgres.jdbc_jar /
(``spark.jars`` / ``.packages``)                                            jdbc_package
executors' ``PGPASSWORD``          the COPY tasks' libpq finds the password  (postgres catalog; a
(``spark.executorEnv.``), from     without it in any task closure           PGPASSWORD / PGPASSFILE of
``CATALOG_ENRICH_PG_DSN``                                                   spark.executorEnv wins)
worker keeps freed memory          no page faults per forward pass          inference.keep_memory
(glibc ``mallopt``)
worker's tokenizer single-threaded the prepare threads tokenize; the          (CPU workers)
(``TOKENIZERS_PARALLELISM``)       tokenizer's pool would take the
                                   forward pass's cores
forward pass's float32 stays       the thresholds were calibrated on        (CUDA; training's
float32 (cuDNN/matmul              float32 scores; TF32 keeps 10 bits       held-out scores too)
``fp32_precision`` ``"ieee"``)
=================================  =======================================  ==================================

All but the last three are applied here, to the session this process builds, locally and on a
cluster alike (under ``spark-submit`` the driver JVM has already started: its JIT setting comes
from the submitted conf, ``deploy/spark/*.conf``); the next two run inside each Python worker
(``inference.predictor.tune_worker_process``), switched by the same config, and the last around
each forward pass whose scores meet thresholds (``models.model.full_float32``). The speed settings
(the C1 JIT, kept freed memory) were measured on against off as whole job processes
(``docs/benchmarks.md``); those that did not pay were removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog_enrichment.config import AppConfig, InferenceConfig, MLflowConfig, SparkConfig
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.versions import ModelVersion

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = [
    "class_archive",
    "configure_logging",
    "device",
    "job_context",
    "local_with_retries",
    "mlflow_client",
    "model_version",
    "spark_conf",
    "spark_session",
    "write_class_archive",
]

C1_JIT = "-XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=256m"
LOCAL_TASK_ATTEMPTS = 4
LOG4J2 = Path(__file__).with_name("log4j2.properties")  # quiet JVM logging from its start (no -v)


def spark_conf(cfg: AppConfig, *, submitted: bool = False) -> dict[str, Any]:
    """The Spark settings of the table above for ``cfg``; ``cfg.spark.conf`` wins over them."""
    conf: dict[str, Any] = {
        "spark.sql.session.timeZone": "UTC",
        # a timestamp filter pushed to a JDBC source is written as an Instant in the session's zone,
        # not as a java.sql.Timestamp in the JVM's, which PostgreSQL (its session in UTC) would read
        # hours off on a JVM not in UTC: the products' window read from it missed rows
        "spark.sql.datetime.java8API.enabled": "true",
        "spark.python.worker.reuse": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.spark.arrow_max_records_per_batch),
        "spark.sql.parquet.columnarReaderBatchSize": str(cfg.spark.arrow_max_records_per_batch),
        "spark.ui.showConsoleProgress": str(sys.stderr.isatty()).lower(),
    }
    local = not submitted and cfg.spark.master.startswith("local")
    if local:
        conf["spark.ui.enabled"] = "false"
        conf["spark.sql.shuffle.partitions"] = str(2 * cfg.spark.local_cores())
    jit = [C1_JIT] if cfg.spark.c1_jit else []
    if jit and not submitted:  # submitted: the conf files carry it (set here, it replaced the cluster's)
        conf["spark.executor.extraJavaOptions"] = " ".join(jit)
    if not submitted:  # the driver JVM starts with this session (in local mode it is the executor)
        quiet = [jvm_option(f"-Dlog4j2.configurationFile={LOG4J2}")] if _spark_log_level() == "ERROR" else []
        archive = class_archive(cfg.spark)
        shared = (
            [*_SHARED_ARCHIVE, jvm_option(f"-XX:SharedArchiveFile={archive}")]
            if archive and archive.is_file()
            else []
        )
        conf["spark.driver.extraJavaOptions"] = " ".join([*jit, *quiet, *shared])
    if cfg.catalog.kind == "postgres":
        key, driver = _jdbc_driver(cfg)
        conf[key] = driver
        password = _pg_password()
        given = {f"spark.executorEnv.{name}" for name in ("PGPASSWORD", "PGPASSFILE")} & set(cfg.spark.conf)
        if password and not given:
            conf["spark.executorEnv.PGPASSWORD"] = password  # Spark masks it (spark.redaction.regex)
    return {**conf, **cfg.spark.conf}


def _jdbc_driver(cfg: AppConfig) -> tuple[str, str]:
    """The PostgreSQL JDBC driver as a Spark setting: ``spark.jars`` (its jar) or
    ``spark.jars.packages`` (its Maven coordinates)."""
    pg = cfg.catalog.postgres
    if pg.jdbc_jar is None:
        if pg.jdbc_package is None:  # the config refuses it; a config built in code may not
            raise CatalogEnrichError("set catalog.postgres.jdbc_jar or catalog.postgres.jdbc_package")
        return "spark.jars.packages", pg.jdbc_package
    if not Path(pg.jdbc_jar).is_file():
        raise CatalogEnrichError(
            f"PostgreSQL JDBC driver {pg.jdbc_jar} not found: apt-get install libpostgresql-jdbc-java, "
            "or set catalog.postgres.jdbc_jar (or jdbc_package with jdbc_jar: null)"
        )
    return "spark.jars", pg.jdbc_jar


def submit_arguments(cfg: AppConfig) -> list[str]:
    """What ``spark-submit`` must be given for ``cfg`` before the driver JVM starts: the PostgreSQL
    JDBC driver (a session adds it to a JVM it starts itself, not to one spark-submit started)."""
    if cfg.catalog.kind != "postgres":
        return []
    key, driver = _jdbc_driver(cfg)
    return ["--jars" if key == "spark.jars" else "--packages", driver]


def jvm_option(option: str) -> str:
    """One JVM option for ``spark.*.extraJavaOptions``, which Spark splits at whitespace outside
    quotes: one naming a path with a space (a checkout under ``My Projects``) is double-quoted."""
    if not any(c.isspace() for c in option):
        return option
    return '"' + option.replace("\\", "\\\\").replace('"', '\\"') + '"'


# An archive written for another JDK or classpath is skipped without a word (-Xshare:auto).
_SHARED_ARCHIVE = ("-Xlog:cds=off", "-Xlog:cds+dynamic=off")


def class_archive(spark: SparkConfig) -> Path | None:
    """Where the class-data-sharing archive of this JDK, this Spark install and ``spark``'s driver
    class path lives (written or not); None when ``spark.class_data_sharing`` is off or no JDK is
    found. A JDK or Spark upgrade gets a new archive."""
    java = _java()
    if not spark.class_data_sharing or java is None:
        return None
    import pyspark
    from pyspark.find_spark_home import _find_spark_home

    jars = sorted(p.name for p in (Path(_find_spark_home()) / "jars").glob("*.jar"))
    stat = java.stat()
    identity = [str(java), stat.st_size, stat.st_mtime_ns, pyspark.__version__, jars,
                spark.conf.get("spark.driver.extraClassPath", "")]  # fmt: skip
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "catalog-enrichment" / "jvm" / f"spark-{key}.jsa"


def _java() -> Path | None:
    """The ``java`` Spark's launcher runs: ``$JAVA_HOME/bin/java``, else the one on the PATH."""
    home = os.environ.get("JAVA_HOME")
    found = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    return Path(found).resolve() if found and Path(found).is_file() else None


def write_class_archive(spark: SparkConfig, *, timeout: float = 300) -> Path | None:
    """Write the class-data-sharing archive :func:`class_archive` names, if it is missing: a
    separate process runs a small local Spark workload (Arrow batches through Python, a Parquet
    round trip, a join) in a JVM that archives the classes it loaded when it exits, then starts a
    second JVM that must map the archive. Only an archive that passed is moved into place (a
    truncated one would crash every JVM that maps it). On any failure the jobs run without one;
    the reason is logged."""
    archive = class_archive(spark)
    if archive is None or archive.is_file():
        return archive
    log = logging.getLogger(__name__)
    log.info("writing the JVM class-data-sharing archive %s (once per JDK and Spark install)", archive)
    tmp = archive.with_name(f"{archive.stem}.{os.getpid()}.tmp")
    try:
        archive.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "catalog_enrichment.runtime", str(tmp),
                   spark.conf.get("spark.driver.extraClassPath", "")]  # fmt: skip
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        ) as proc:
            try:
                out = proc.communicate(timeout=timeout)[0].decode(errors="replace")
            finally:  # an interrupt or a timeout stops the writer and its JVMs too
                if proc.poll() is None:
                    os.killpg(proc.pid, 9)
        if proc.returncode != 0 or not tmp.is_file():
            raise RuntimeError(f"exit {proc.returncode}: {out.strip()[-500:]}")
        os.replace(tmp, archive)
        return archive
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("no JVM class-data-sharing archive (%s); Spark starts without one", exc)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def _archive_classes(tmp: Path, class_path: str) -> None:
    """The writer process of :func:`write_class_archive`."""
    import pyarrow as pa
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    def session(*options: str) -> SparkSession:
        driver = [C1_JIT, jvm_option(f"-Dlog4j2.configurationFile={LOG4J2}"), *_SHARED_ARCHIVE, *options]
        builder = SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
        if class_path:
            builder = builder.config("spark.driver.extraClassPath", class_path)
        return builder.config("spark.driver.extraJavaOptions", " ".join(driver)).getOrCreate()

    def stop_jvm(spark: SparkSession) -> None:
        gateway: Any = spark.sparkContext._gateway
        spark.stop()
        gateway.proc.stdin.close()  # the JVM exits when its driver's pipe closes (and dumps then)
        gateway.proc.wait(timeout=120)
        SparkContext._gateway = SparkContext._jvm = None  # the next session launches a new JVM

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = session(jvm_option(f"-XX:ArchiveClassesAtExit={tmp}"))
    frame = spark.createDataFrame(pa.table({"k": [1, 2, 3], "v": ["a", "b", "c"]}).to_pandas())
    doubled = frame.mapInArrow(lambda batches: (b for b in batches), frame.schema)
    folder = tmp.with_suffix(".parquet")
    try:
        doubled.write.mode("overwrite").parquet(str(folder))
        spark.read.parquet(str(folder)).join(frame.select("k"), "k").groupBy("v").count().collect()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    stop_jvm(spark)
    spark = session(jvm_option(f"-XX:SharedArchiveFile={tmp}"), "-Xshare:on")  # it must map, or this fails
    jvm: Any = spark.sparkContext._jvm
    info = str(jvm.java.lang.System.getProperty("java.vm.info"))
    stop_jvm(spark)
    if "sharing" not in info:
        raise SystemExit(f"the archive was not mapped ({info})")


def _pg_password() -> str | None:
    """The PostgreSQL password this process connects with: the DSN's, else ``PGPASSWORD``."""
    from psycopg.conninfo import conninfo_to_dict

    from catalog_enrichment.catalog.postgres import PG_DSN_ENV

    try:
        given = conninfo_to_dict(os.environ.get(PG_DSN_ENV, ""))
    except Exception:  # a DSN that does not parse is reported when the catalog connects
        given = {}
    return str(given.get("password") or os.environ.get("PGPASSWORD") or "") or None


def local_with_retries(master: str) -> str:
    """A local master that retries a failed task as a cluster does (``local[N]`` ->
    ``local[N,4]``: Spark's own ``spark.task.maxFailures`` default); others unchanged."""
    match = re.fullmatch(r"local(?:\[\s*(\*|\d+)\s*\])?", master.strip())
    if match is None:
        return master
    return f"local[{match.group(1) or 1},{LOCAL_TASK_ATTEMPTS}]"


def configure_logging(verbosity: int = 0) -> None:
    """Quiet by default: the job's own progress lines and warnings; ``-v`` adds this package's info
    logs, ``-vv`` MLflow's, Spark's and the other libraries' too."""
    import logging

    from catalog_enrichment.redaction import redact_records

    redact_records()  # no secret reaches a log line
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO if verbosity >= 2 else logging.WARNING)
    for handler in logging.getLogger().handlers:  # libraries that set their own loggers' levels too
        handler.setLevel(logging.INFO if verbosity else logging.WARNING)
    logging.getLogger("catalog_enrichment").setLevel(logging.INFO if verbosity >= 1 else logging.WARNING)
    for noisy in ("mlflow", "alembic", "py4j", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbosity >= 2 else logging.WARNING)
    # MLflow sets its own loggers' level when it is imported, from this variable
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbosity >= 2 else "WARNING")


def _spark_log_level() -> str:
    """The JVM's log level, from this process's logging (:func:`configure_logging`): ERROR by
    default, WARN with -v, INFO with -vv."""
    import logging

    if logging.getLogger("py4j").getEffectiveLevel() <= logging.INFO:
        return "INFO"
    return "WARN" if logging.getLogger("catalog_enrichment").getEffectiveLevel() <= logging.INFO else "ERROR"


def spark_session(cfg: AppConfig) -> SparkSession:
    """The job's SparkSession. Under spark-submit the submitted master wins."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ  # the driver was started by spark-submit
    if not submitted:
        write_class_archive(cfg.spark)
    builder = SparkSession.builder.appName(cfg.spark.app_name)
    if not submitted:
        if cfg.spark.master.startswith("local"):
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = builder.master(local_with_retries(cfg.spark.master))
    conf = spark_conf(cfg, submitted=submitted)
    try:
        with _unconnected_jvm_stopped_on_ctrl_c():
            if not submitted:
                _launch_jvm_without_secrets(conf, cfg.spark.master)
            spark = builder.config(map=conf).getOrCreate()
    except BaseException:
        _stop_unconnected_jvms()
        raise
    spark.sparkContext.setLogLevel(_spark_log_level())
    return spark


def _launch_jvm_without_secrets(conf: dict[str, Any], master: str) -> None:
    """Start the driver JVM with every setting but the secrets (``spark.executorEnv.PGPASSWORD``, any
    key :func:`~catalog_enrichment.redaction.is_secret_name` names): PySpark passes the settings it
    starts the JVM with as ``--conf`` arguments, which every local user reads in the process list
    for the whole run. The session then hands the JVM the secrets through its gateway."""
    from pyspark import SparkConf, SparkContext

    from catalog_enrichment.redaction import is_secret_name

    public = {k: str(v) for k, v in conf.items() if not is_secret_name(k)}
    if SparkContext._gateway is None and len(public) < len(conf):
        launch = (
            SparkConf(loadDefaults=False).setAll(list(public.items())).setMaster(local_with_retries(master))
        )
        SparkContext._ensure_initialized(conf=launch)


def _stop_unconnected_jvms() -> None:
    """Stop the JVM a failed or interrupted session start leaves behind. PySpark starts it ignoring
    SIGINT and connects later; a Ctrl-C in between removes the folder the JVM writes its port to,
    and the JVM, which only exits when its driver closes the connection, would run on for good."""
    import psutil

    for child in psutil.Process().children():
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if "org.apache.spark.deploy.SparkSubmit" in command and "pyspark-shell" in command:
            child.terminate()


@contextlib.contextmanager
def _unconnected_jvm_stopped_on_ctrl_c() -> Iterator[None]:
    """While PySpark starts its JVM, a Ctrl-C stops that JVM in the signal handler, before the
    interrupt unwinds into PySpark's clean-up, which removes the JVM's port folder: a parent that
    kills the driver right after the Ctrl-C (``subprocess.run`` does, a quarter-second after a Ctrl-C
    both got) then leaves no JVM behind. Until then the folder is there, and a JVM whose driver is
    killed writes its port, reads the closed pipe and exits. Once connected, the JVM exits with the
    driver anyway; PySpark's own handler (cancel the jobs) replaces this one as the context starts."""
    import signal
    import threading

    import psutil  # noqa: F401 - imported now, not in the handler
    from pyspark import SparkContext

    before = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(before):
        yield
        return

    def interrupted(signum: int, frame: Any) -> None:
        if SparkContext._gateway is None:
            _stop_unconnected_jvms()
        before(signum, frame)

    signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is interrupted:
            signal.signal(signal.SIGINT, before)


def device(inference: InferenceConfig) -> str:
    """``inference.device`` resolved (:func:`catalog_enrichment.inference.resolve_device`)."""
    from catalog_enrichment.inference import resolve_device

    return resolve_device(inference.device)


def mlflow_client(mlflow: MLflowConfig) -> Any:
    from catalog_enrichment import registry

    return registry.configure_mlflow(mlflow.tracking_uri, mlflow.registry_uri)


def model_version(cfg: AppConfig, model_uri: str | None, client: Any) -> ModelVersion:
    """The version ``model_uri`` names (default: the champion), its bundle downloaded once."""
    from catalog_enrichment import registry

    registry.check_tracking_server(client)
    resolved = registry.resolve_model(client, model_uri or f"models:/{cfg.mlflow.registered_model}@champion")
    return registry.download_bundle(client, resolved, Path(cfg.catalog.root) / "_models")


def job_context(cfg: AppConfig, model_uri: str | None) -> tuple[Any, Any, ModelVersion]:
    """The SparkSession, the MLflow client and the model version an enrichment job runs with (its
    MLflow experiment checked: a deleted one is refused before anything is read).

    The JVM starts in a thread while MLflow resolves and downloads the model: neither needs the
    other, and a job process would otherwise wait for one and then the other. Great Expectations
    (seconds of imports) is imported in another meanwhile when the run's checkpoint is on.
    """
    from concurrent.futures import ThreadPoolExecutor

    from catalog_enrichment.validation.suite import quiet_gx

    with ThreadPoolExecutor(2, thread_name_prefix="job-context") as pool:
        session = pool.submit(spark_session, cfg)
        gx = pool.submit(quiet_gx) if cfg.validation.great_expectations else None
        client = mlflow_client(cfg.mlflow)
        model = model_version(cfg, model_uri, client)
        # its runs are logged there once the catalog is written: a deleted experiment fails now
        from catalog_enrichment import registry

        registry.check_experiment(client, cfg.mlflow.enrichment_experiment)
        if gx is not None:
            gx.result()
        return session.result(), client, model


if __name__ == "__main__":  # the class-data-sharing archive's writer (write_class_archive)
    _archive_classes(Path(sys.argv[1]), sys.argv[2])
