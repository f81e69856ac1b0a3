"""deploy/ holds configuration, not logic: scripts parse, YAML loads, nothing imports the package."""

from __future__ import annotations

import re
import string
import subprocess
from pathlib import Path

import pytest
import yaml

from catalog_enrichment import runtime
from catalog_enrichment.config import AppConfig
from tests.conftest import repo_root

DEPLOY = repo_root() / "deploy"
pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("script", sorted(p.name for p in DEPLOY.rglob("*.sh")) or ["none"])
def test_shell_scripts_parse_and_are_executable(script: str) -> None:
    path = next(DEPLOY.rglob(script))
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert path.stat().st_mode & 0o111, f"{path} is not executable"


def test_yaml_files_load() -> None:
    files = list(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path


TEXT = {".py", ".sh", ".yaml", ".conf", ".txt", ".md"}


def _deploy_files() -> list[Path]:
    """The kinds of file kept under deploy/ (not __pycache__ or other generated files)."""
    return [
        p
        for p in DEPLOY.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and (p.suffix in TEXT or p.name in ("Dockerfile", "crontab"))
    ]


def test_deploy_has_no_business_logic() -> None:
    """Only jobs/ entry points, the catalog-enrich CLI and parameters are named there."""
    files = _deploy_files()
    assert len(files) >= 12
    for path in files:
        assert not re.search(r"^\s*(from|import)\s+catalog_enrichment", path.read_text(), re.M), path
    jobs = {p.stem for p in (repo_root() / "jobs").glob("*.py")}
    named = set(re.findall(r"jobs/(\w+)\.py", " ".join(p.read_text() for p in files)))
    assert named <= jobs | {"JOB", "job"}


def test_dockerfile_and_spark_application() -> None:
    docker = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime", docker, re.M)
    assert "openjdk-17" in docker and "-c /tmp/constraints.txt" in docker
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "catalog-enrich"]' in docker
    app = yaml.safe_load((DEPLOY / "docker" / "sparkapplication-nightly.yaml").read_text())
    assert app["kind"] == "SparkApplication"
    assert app["spec"]["mainApplicationFile"].endswith("/jobs/enrich.py")
    # the incremental nightly (no partition) under a run id fixed per night, as Airflow's: a night run
    # again is the same run. Applied with the night's date for ${DAY}; unsubstituted, the name is not
    # one Kubernetes takes, so a night never runs under the literal id
    dns_name = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
    assert app["spec"]["arguments"] == ["--run-id", "nightly-${DAY}"]
    assert not dns_name.fullmatch(app["metadata"]["name"])
    text = (DEPLOY / "docker" / "sparkapplication-nightly.yaml").read_text()
    assert "DAY=$(date -u +%F) envsubst '$DAY' < deploy/docker/sparkapplication-nightly.yaml" in text
    night = yaml.safe_load(string.Template(text).safe_substitute(DAY="2026-11-02"))  # as envsubst
    assert night["spec"]["arguments"] == ["--run-id", "nightly-2026-11-02"]
    assert dns_name.fullmatch(night["metadata"]["name"]), night["metadata"]["name"]
    # not retried by the operator: it cannot tell an aborted run (exit 3, bad data) from a failure
    assert app["spec"]["restartPolicy"] == {"type": "Never"}
    assert app["spec"]["timeToLiveSeconds"] > 0  # a night's application and pods do not pile up
    assert app["spec"]["sparkConf"]["spark.task.resource.gpu.amount"] == "1"
    for conf in ("local", "standalone", "yarn", "k8s"):
        lines = (DEPLOY / "spark" / f"{conf}.conf").read_text().splitlines()
        props = dict(line.split(None, 1) for line in lines if line.strip() and not line.startswith("#"))
        # what the job's runtime sets is not repeated here (it would win anyway)
        assert not set(props) & set(runtime.spark_conf(AppConfig(), submitted=True)), conf
    assert "-XX:TieredStopAtLevel=1" in (DEPLOY / "spark" / "local.conf").read_text()
    # submitted, the executors' JVM options are the conf files' (or the user's --conf), never
    # replaced by the session: they carry the C1 JIT flags themselves
    assert "spark.executor.extraJavaOptions" not in runtime.spark_conf(AppConfig(), submitted=True)
    for conf in ("standalone", "yarn", "k8s"):
        assert runtime.C1_JIT in (DEPLOY / "spark" / f"{conf}.conf").read_text(), conf
    assert app["spec"]["sparkConf"]["spark.executor.extraJavaOptions"] == runtime.C1_JIT
    assert "local[*,4]" in (DEPLOY / "spark" / "local.conf").read_text()  # a failed task is tried again
    # the GPU discovery script is where the image puts it
    docker_path = re.search(r"cp deploy/spark/gpu-discovery.sh (\S+)", docker)
    assert docker_path is not None
    for text in ((DEPLOY / "spark" / "k8s.conf").read_text(), str(app["spec"]["sparkConf"])):
        assert docker_path.group(1) in text


def _submitted(tmp_path: Path, *args: str, **env: str) -> list[str]:
    """The arguments ``submit.sh`` hands spark-submit (a stand-in that prints them); what it said
    goes to ``tmp_path / "said"``."""
    import os

    spark = tmp_path / "spark"
    (spark / "bin").mkdir(parents=True, exist_ok=True)
    (spark / "bin" / "spark-submit").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (spark / "bin" / "spark-submit").chmod(0o755)
    done = subprocess.run(
        [str(DEPLOY / "spark" / "submit.sh"), *args],
        env={**os.environ, "SPARK_HOME": str(spark), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (tmp_path / "said").write_text(done.stderr)
    return done.stdout.splitlines()


def test_a_postgres_catalog_s_jdbc_driver_is_given_to_spark_submit(tmp_path: Path) -> None:
    """A session cannot add a jar to a driver JVM spark-submit started: submit.sh passes the config's
    JDBC driver (its jar, or its Maven package) itself; a lakehouse catalog needs none."""
    jar = tmp_path / "postgresql.jar"
    jar.write_bytes(b"")
    config = tmp_path / "pg.yaml"
    config.write_text(yaml.safe_dump({"catalog": {"kind": "postgres", "postgres": {"jdbc_jar": str(jar)}}}))
    args = _submitted(tmp_path, "standalone", "enrich", "--config", str(config))
    assert args[args.index("--jars") + 1] == str(jar) and args[-2:] == ["--config", str(config)]
    package = {
        "catalog": {
            "kind": "postgres",
            "postgres": {"jdbc_jar": None, "jdbc_package": "org.postgresql:postgresql:42.7.4"},
        }
    }
    config.write_text(yaml.safe_dump(package))
    args = _submitted(tmp_path, "yarn", "enrich", "--config", str(config))
    assert args[args.index("--packages") + 1] == "org.postgresql:postgresql:42.7.4"
    assert "--jars" not in _submitted(tmp_path, "local", "enrich") and "--packages" not in _submitted(
        tmp_path, "local", "enrich"
    )
    # cluster mode: the config shipped with --files exists only in the driver's container; the job
    # is submitted all the same, and the script says what it could not give
    args = _submitted(tmp_path, "yarn", "enrich", "--config", "prod.yaml")
    assert args[-3:] == [str(DEPLOY.parent / "jobs" / "enrich.py"), "--config", "prod.yaml"]
    assert "the job's config cannot be read here" in (tmp_path / "said").read_text()


@pytest.mark.parametrize(("mode", "driver_here"), [("local", True), ("standalone", True), ("yarn", False)])
def test_a_packed_environment_is_the_driver_s_only_where_the_driver_runs_in_a_container(
    tmp_path: Path, mode: str, driver_here: bool
) -> None:
    """In client mode the driver runs on the submitting host, where ./environment is not unpacked:
    it keeps a local interpreter (spark-submit here is a stand-in that prints its arguments)."""
    import os

    spark = tmp_path / "spark"
    (spark / "bin").mkdir(parents=True)
    (spark / "bin" / "spark-submit").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (spark / "bin" / "spark-submit").chmod(0o755)
    env = {
        **os.environ,
        "SPARK_HOME": str(spark),
        "CATALOG_ENRICH_ENV": "env.tar.gz",
        "PYSPARK_PYTHON": "/opt/py",
    }
    done = subprocess.run(
        [str(DEPLOY / "spark" / "submit.sh"), mode, "enrich"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    args = done.stdout.splitlines()
    assert "spark.executorEnv.PYSPARK_PYTHON=./environment/bin/python" in args
    assert ("spark.pyspark.driver.python=/opt/py" in args) == driver_here
