"""deploy/ holds configuration, not logic: scripts parse, YAML loads, nothing imports the package."""

from __future__ import annotations

import re
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
    assert "arguments" not in app["spec"]  # the incremental nightly: no fixed run id or partition
    assert app["spec"]["sparkConf"]["spark.task.resource.gpu.amount"] == "1"
    for conf in ("local", "standalone", "yarn", "k8s"):
        lines = (DEPLOY / "spark" / f"{conf}.conf").read_text().splitlines()
        props = dict(line.split(None, 1) for line in lines if line.strip() and not line.startswith("#"))
        # what the job's runtime sets is not repeated here (it would win anyway)
        assert not set(props) & set(runtime.spark_conf(AppConfig(), submitted=True)), conf
    assert "-XX:TieredStopAtLevel=1" in (DEPLOY / "spark" / "local.conf").read_text()
    # the GPU discovery script is where the image puts it
    docker_path = re.search(r"cp deploy/spark/gpu-discovery.sh (\S+)", docker)
    assert docker_path is not None
    for text in ((DEPLOY / "spark" / "k8s.conf").read_text(), str(app["spec"]["sparkConf"])):
        assert docker_path.group(1) in text


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
