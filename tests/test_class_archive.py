"""The JVM class-data-sharing archive (``spark.class_data_sharing``): where it lives, when a session
maps it, and its writer (``runtime.write_class_archive``)."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from catalog_enrichment import runtime
from catalog_enrichment.config import AppConfig, SparkConfig

pytestmark = pytest.mark.timeout(60)


def _driver_options(cfg: AppConfig) -> str:
    return str(runtime.spark_conf(cfg)["spark.driver.extraJavaOptions"])


def test_a_session_maps_the_archive_only_once_it_is_written_and_never_when_switched_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    archive = runtime.class_archive(SparkConfig())
    assert archive is not None and archive.parent == tmp_path / "catalog-enrichment" / "jvm"
    assert "SharedArchiveFile" not in _driver_options(AppConfig())  # not written yet
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"")
    assert f"-XX:SharedArchiveFile={archive}" in _driver_options(AppConfig())
    assert "-Xlog:cds=off" in _driver_options(AppConfig())  # one for another JDK is skipped silently
    assert "SharedArchiveFile" not in _driver_options(AppConfig(spark={"class_data_sharing": False}))
    assert runtime.class_archive(SparkConfig(class_data_sharing=False)) is None
    # another driver class path is another archive (the JVM maps one only for its own class path)
    other = SparkConfig(conf={"spark.driver.extraClassPath": "/opt/extra.jar"})
    assert runtime.class_archive(other) not in (None, archive)


def _writers(tmp: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(tmp) in part for part in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


@pytest.mark.spark
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_writer_installs_an_archive_a_jvm_maps_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # stopped part-way (here by its timeout; an interrupt takes the same path): nothing installed,
    # no temporary file, no writer process or JVM left
    assert runtime.write_class_archive(SparkConfig(), timeout=3) is None
    folder = tmp_path / "catalog-enrichment" / "jvm"
    assert list(folder.iterdir()) == []
    time.sleep(1)
    assert _writers(folder) == []
    # to its end: the writer's second JVM mapped it (-Xshare:on), or it would not be installed
    archive = runtime.write_class_archive(SparkConfig())
    assert archive is not None and archive == runtime.class_archive(SparkConfig())
    assert [p.name for p in folder.iterdir()] == [archive.name] and archive.stat().st_size > 10_000_000
    started = time.perf_counter()
    assert runtime.write_class_archive(SparkConfig()) == archive  # written once
    assert time.perf_counter() - started < 1


def test_a_path_with_a_space_stays_one_jvm_option_for_spark_s_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spark's launcher splits ``extraJavaOptions`` at whitespace: a checkout or cache folder with a
    space in its name stays one option (asked of the launcher itself, as a session's JVM starts)."""
    import os
    import subprocess

    import pyspark

    cache = tmp_path / "My Cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    archive = runtime.class_archive(SparkConfig())
    assert archive is not None
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"")
    options = _driver_options(AppConfig())
    home = Path(pyspark.__file__).parent
    built = subprocess.run(
        ["java", "-cp", f"{home}/jars/*", "org.apache.spark.launcher.Main",
         "org.apache.spark.deploy.SparkSubmit", "--conf", f"spark.driver.extraJavaOptions={options}",
         "pyspark-shell"],
        env={**os.environ, "SPARK_HOME": str(home), "SPARK_SCALA_VERSION": "2.13"},
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    command = built.stdout.decode().split("\0")
    assert f"-XX:SharedArchiveFile={archive}" in command
    assert runtime.jvm_option('-Da=b "c" d') == '"-Da=b \\"c\\" d"' and runtime.jvm_option("-Da=b") == "-Da=b"
