"""``catalog-enrich bench chaos`` (``make chaos``): the job as real processes, killed and disturbed
mid-run, and what the catalog holds afterwards.

Every scenario starts from the same catalog (the merchants' values) in a folder of its own, runs
``catalog-enrich`` processes the way a scheduler does, disturbs them (SIGKILL of a Python worker or
of the driver at a point of the write, two runs at once, the MLflow server down, a model artifact
missing or corrupt), lets the next run finish where one was killed, and compares the attribute
table with an undisturbed run's:

* **rows lost**: values the undisturbed run wrote that are missing;
* **wrong rows**: values it did not write, or written twice;
* **half-committed**: a state seen between the kill and the next run that is neither the table
  before the run nor the table after it, or quarantine rows written twice.

A scenario passes when its process ended as expected (exit code, a message naming the cause and the
next step) and all three counts are 0. The kill points are the fault hooks of
``catalog_enrichment.faults`` (``CATALOG_ENRICH_FAULT``), which nothing sets in production.

The disturbed runs (a kill, a lock race, a dead server) are always real processes. The others (the
undisturbed reference, the re-run after a kill, a run on a damaged artifact) go through a
:data:`Runner`: a process too by default; the test suite runs them in its own process instead.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from catalog_enrichment.catalog.attributes import find_run_commit, merchant_rows
from catalog_enrichment.catalog.lakehouse import read_table, table_version, write_table
from catalog_enrichment.catalog.products import list_partitions
from catalog_enrichment.catalog.reports import read_reports
from catalog_enrichment.faults import FAULT_ENV
from catalog_enrichment.inference.bundle import BundleFolder
from catalog_enrichment.types import Say

__all__ = [
    "SCENARIOS",
    "ChaosSetup",
    "Finished",
    "Observation",
    "Runner",
    "format_table",
    "prepare",
    "run_chaos",
    "write_result",
]

# The values that make a row what it is (not when or by which run it was written).
_ROW = ("product_id", "attribute", "value", "source", "model_version")


@dataclass(frozen=True)
class ChaosSetup:
    """What the scenarios run on: a products table and a registered champion model; ``settings``
    are more ``--set KEY=VALUE`` for every run, ``process_settings`` for the disturbed processes
    only (not for the undisturbed runs of a ``follow_up`` runner, which may share a session)."""

    workdir: Path
    products: Path
    tracking_uri: str
    model_name: str
    settings: tuple[str, ...] = ()
    process_settings: tuple[str, ...] = ()


@dataclass
class Observation:
    """One scenario's row of the table."""

    scenario: str
    expected: str
    observed: str = ""
    rows_lost: int = 0
    wrong_rows: int = 0
    half_committed: int = 0
    passed: bool = False
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)


@dataclass
class Finished:
    """How a ``catalog-enrich`` command ended."""

    code: int
    out: str
    err: str
    seconds: float

    def error_line(self) -> str:
        lines = [ln for ln in self.err.splitlines() if ln.startswith("catalog-enrich: error:")]
        return lines[-1] if lines else ""


# Runs ``catalog-enrich`` with these arguments (the program name left out) to its end.
Runner = Callable[[Sequence[str]], Finished]


class _Bench:
    """The scenarios' shared state: the setup, the reference tables, the command line."""

    def __init__(self, setup: ChaosSetup, say: Say, follow_up: Runner | None = None) -> None:
        self.setup, self.say = setup, say
        self.follow_up = follow_up or self.process
        self.root = setup.workdir / "scenarios"
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.base = self.root / "base"
        from catalog_enrichment.contracts import load_taxonomy

        products = read_table(setup.products, columns=["product_id", "merchant_attributes"])
        names = load_taxonomy().outputs.names  # the default taxonomy, the runs' and prepare's
        merchant = merchant_rows(products, dt.datetime(2026, 1, 1, tzinfo=dt.UTC), names)
        write_table(self.base / "attributes", merchant)
        self.before = _rows(read_table(self.base / "attributes"))
        self.dates = list_partitions(setup.products, "ingest_date")
        ref = self.catalog("reference")
        proc = self.again(ref, "enrich", "--run-id", "reference")
        if proc.code != 0:
            raise RuntimeError(f"the undisturbed run failed ({proc.code}): {proc.err[-2000:]}")
        self.after = _rows(read_table(ref / "attributes"))
        self.quarantined = read_table(ref / "quarantine").num_rows if (ref / "quarantine").exists() else 0
        if self.after == self.before:
            raise RuntimeError("the undisturbed run wrote no value: the chaos scenarios would prove nothing")

    def catalog(self, name: str) -> Path:
        root = self.root / name
        shutil.copytree(self.base, root)
        return root

    def arguments(
        self, root: Path, verb: str, *args: str, uri: str | None = None, process: bool = False
    ) -> list[str]:
        flags = [
            "--products", str(self.setup.products),
            "--catalog", str(root),
            "--set", f"mlflow.tracking_uri={uri or self.setup.tracking_uri}",
            "--set", f"mlflow.registered_model={self.setup.model_name}",
            "--set", "inference.device=cpu",
            "--set", "validation.max_invalid_fraction=0.2",
        ]  # fmt: skip
        for setting in (*self.setup.settings, *(self.setup.process_settings if process else ())):
            flags += ["--set", setting]
        if verb == "enrich":
            flags.append("--full")
        return [verb, *flags, *args]

    def start(self, root: Path, verb: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
        """A process writing its output (both streams) to ``log``."""
        with log.open("wb") as out:
            command = [*_cli(), *self.arguments(root, verb, *args, process=True)]
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def cli(
        self, root: Path, verb: str, *args: str, env: dict[str, str] | None = None, uri: str | None = None
    ) -> Finished:
        """A real process (``env`` added to this one's environment)."""
        return self.process(self.arguments(root, verb, *args, uri=uri, process=True), env)

    def again(self, root: Path, verb: str, *args: str) -> Finished:
        """An undisturbed run, through the follow-up runner."""
        return self.follow_up(self.arguments(root, verb, *args))

    @staticmethod
    def process(arguments: Sequence[str], env: dict[str, str] | None = None) -> Finished:
        started = time.perf_counter()
        done = subprocess.run(
            [*_cli(), *arguments],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=900,
        )
        return Finished(done.returncode, done.stdout, done.stderr, time.perf_counter() - started)

    def counts(self, root: Path, obs: Observation) -> None:
        """Rows lost and wrong against the undisturbed run."""
        now = _rows(read_table(root / "attributes"))
        obs.rows_lost = sum((self.after - now).values())
        obs.wrong_rows = sum((now - self.after).values())

    def between(self, root: Path) -> int:
        """1 when the table (between a kill and the next run) is neither before nor after."""
        now = _rows(read_table(root / "attributes"))
        return 0 if now in (self.before, self.after) else 1

    def quarantine_once(self, root: Path, run_id: str) -> int:
        """1 when the run's quarantine rows are missing or written twice."""
        if not (root / "quarantine").exists():
            return int(self.quarantined != 0)
        table = read_table(root / "quarantine", columns=["run_id"])
        mine = sum(1 for r in table["run_id"].to_pylist() if r == run_id)
        return int(mine != self.quarantined)

    def report_status(self, root: Path, run_id: str) -> str | None:
        reports = [r for r in read_reports(root / "run_reports") if r.run_id == run_id]
        return reports[0].status if reports else None


def _rows(table: pa.Table) -> Counter[tuple[Any, ...]]:
    return Counter(zip(*(table[c].to_pylist() for c in _ROW), strict=True))


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("catalog-enrich")
    return (
        [str(script)]
        if script.is_file()
        else [sys.executable, "-c", "from catalog_enrichment.cli import run; run()"]
    )


# -- the scenarios ---------------------------------------------------------------------------------


def _worker_killed(b: _Bench) -> Observation:
    obs = Observation(
        "Python worker SIGKILLed mid-scoring", "task retried; run succeeds; table as undisturbed"
    )
    root = b.catalog("worker-killed")
    marker = root / "worker-killed.marker"
    proc = b.cli(root, "enrich", "--run-id", "w1", env={FAULT_ENV: f"worker:{marker}"})
    b.counts(root, obs)
    obs.half_committed = b.quarantine_once(root, "w1")
    obs.observed = f"exit {proc.code}, worker killed: {marker.exists()}, report {b.report_status(root, 'w1')}"
    obs.passed = proc.code == 0 and marker.exists() and b.report_status(root, "w1") == "succeeded"
    return obs


def _driver_killed(point: str, expected_state: str) -> Callable[[_Bench], Observation]:
    def scenario(b: _Bench) -> Observation:
        obs = Observation(
            f"driver SIGKILLed {point.replace('_', ' ')}",
            f"table {expected_state}; the same run id then finishes once; staging removed",
        )
        root = b.catalog(f"killed-{point}")
        killed = b.cli(root, "enrich", "--run-id", "k1", env={FAULT_ENV: point})
        obs.half_committed = b.between(root)
        state = "unchanged" if _rows(read_table(root / "attributes")) == b.before else "committed"
        version = table_version(root / "attributes")
        rerun = b.again(root, "enrich", "--run-id", "k1")
        b.counts(root, obs)
        obs.half_committed += b.quarantine_once(root, "k1")
        commit = find_run_commit(root / "attributes", "k1")
        once = commit is not None and (state == "unchanged" or commit == version)
        staging = root / "_staging"
        clean = not staging.exists() or not any(staging.iterdir())
        obs.observed = (
            f"killed (exit {killed.code}), table {state}; re-run exit {rerun.code}, "
            f"{'one commit' if once else 'commit missing or repeated'}, "
            f"staging {'empty' if clean else 'left'}"
        )
        allowed = (
            ("unchanged", "committed") if expected_state == "unchanged or committed" else (expected_state,)
        )
        obs.passed = killed.code == -9 and state in allowed and rerun.code == 0 and once and clean
        return obs

    return scenario


def _two_at_once(second: str) -> Callable[[_Bench], Observation]:
    def scenario(b: _Bench) -> Observation:
        from catalog_enrichment.catalog.lock import catalog_lock

        obs = Observation(
            f"enrich and {second} on one catalog at once",
            "each waits for the catalog lock, then commits alone; both succeed; table as undisturbed",
        )
        root = b.catalog(f"concurrent-{second}")
        args = ("--run-id", "c1") if second == "enrich" else ("--from", b.dates[0], "--to", b.dates[-1])
        logs = [root.parent / f"concurrent-{second}-{i}.log" for i in range(2)]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            # the harness holds the lock until both processes wait for it: they contend for certain
            with catalog_lock(root, owner="chaos harness", wait_seconds=0):
                procs.append(b.start(root, "enrich", "--run-id", "c0", log=logs[0]))
                procs.append(b.start(root, second, *args, log=logs[1]))
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and not all("waiting up to" in _text(f) for f in logs):
                    if any(p.poll() is not None for p in procs):
                        break
                    time.sleep(0.5)
                waited = sum("waiting up to" in _text(f) for f in logs)
            codes = [p.wait(timeout=900) for p in procs]
        finally:  # interrupted (a Ctrl-C, a test's timeout): neither run is left behind
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait(timeout=60)
        b.counts(root, obs)
        obs.half_committed = b.quarantine_once(root, "c0")
        statuses = {r.run_id: r.status for r in read_reports(root / "run_reports")}
        obs.observed = (
            f"exits {codes}, {waited} of 2 waited for the lock, reports {sorted(set(statuses.values()))}"
        )
        obs.passed = codes == [0, 0] and waited == 2 and set(statuses.values()) == {"succeeded"}
        return obs

    return scenario


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fails_cleanly(b: _Bench, obs: Observation, root: Path, proc: Finished, *words: str) -> Observation:
    """Nothing may have changed: rows lost and wrong are counted against the table before."""
    line = proc.error_line()
    now = _rows(read_table(root / "attributes"))
    obs.rows_lost, obs.wrong_rows = sum((b.before - now).values()), sum((now - b.before).values())
    obs.observed = f"exit {proc.code}: {line[:160]}"
    obs.messages = [line]
    one_line = "Traceback" not in proc.err and bool(line)
    obs.passed = proc.code == 2 and one_line and all(w in line for w in words)
    return obs


def _mlflow_down(b: _Bench) -> Observation:
    obs = Observation(
        "MLflow server down at start",
        "exit 2, one line naming the server and what to do; nothing written",
    )
    root = b.catalog("mlflow-down")
    proc = b.cli(root, "enrich", uri=f"http://127.0.0.1:{_free_port()}")
    return _fails_cleanly(b, obs, root, proc, "unreachable", "start it")


def _damaged_artifact(kind: str) -> Callable[[_Bench], Observation]:
    def scenario(b: _Bench) -> Observation:
        import mlflow

        from catalog_enrichment import registry

        obs = Observation(
            f"model artifact {kind}",
            "exit 2, one line naming the model and what to do; nothing written",
        )
        root = b.catalog(f"artifact-{kind}")
        client = registry.configure_mlflow(b.setup.tracking_uri)
        champion = client.get_model_version_by_alias(b.setup.model_name, registry.CHAMPION)
        copy = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=client.get_model_version_download_uri(b.setup.model_name, champion.version),
                dst_path=str(root.parent / f"artifact-{kind}-copy"),
                tracking_uri=b.setup.tracking_uri,
            )
        )
        version = client.create_model_version(b.setup.model_name, str(copy), run_id=champion.run_id).version
        found = BundleFolder.find(copy)
        assert found is not None
        weights = found.weights
        if kind == "missing":
            shutil.rmtree(copy)
        else:
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 2])
        proc = b.again(root, "enrich", "--model-uri", f"models:/{b.setup.model_name}/{version}")
        return _fails_cleanly(b, obs, root, proc, f"models:/{b.setup.model_name}/{version}", "register")

    return scenario


SCENARIOS: dict[str, Callable[[_Bench], Observation]] = {
    "worker_killed": _worker_killed,
    "killed_before_merge": _driver_killed("before_merge", "unchanged"),
    "killed_during_merge": _driver_killed("during_merge", "unchanged or committed"),
    "killed_after_merge": _driver_killed("after_merge", "committed"),
    "killed_after_quarantine": _driver_killed("after_quarantine", "committed"),
    "two_enrich_runs": _two_at_once("enrich"),
    "enrich_and_backfill": _two_at_once("backfill"),
    "mlflow_down": _mlflow_down,
    "artifact_missing": _damaged_artifact("missing"),
    "artifact_corrupt": _damaged_artifact("corrupt"),
}


def run_chaos(
    setup: ChaosSetup,
    *,
    scenarios: Sequence[str] | None = None,
    say: Say = print,
    follow_up: Runner | None = None,
) -> list[Observation]:
    """Run the scenarios (default: all) on ``setup``; one observation each. ``follow_up`` runs the
    undisturbed commands (default: a process each)."""
    names = list(scenarios or SCENARIOS)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown chaos scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    say("chaos: the undisturbed run first (the reference)")
    bench = _Bench(setup, say, follow_up)
    observations = []
    for i, name in enumerate(names, start=1):
        started = time.perf_counter()
        obs = SCENARIOS[name](bench)
        obs.seconds = round(time.perf_counter() - started, 1)
        obs.passed = obs.passed and obs.rows_lost == 0 and obs.wrong_rows == 0 and obs.half_committed == 0
        say(f"[chaos {i}/{len(names)}] {obs.scenario}: {'ok' if obs.passed else 'FAILED'} ({obs.observed})")
        observations.append(obs)
    return observations


def format_table(observations: Sequence[Observation]) -> str:
    """The observations as a markdown table."""
    head = "| scenario | expected | observed | rows lost | wrong rows | half-committed | result |"
    lines = [head, "|" + "---|" * 7]
    for o in observations:
        lines.append(
            f"| {o.scenario} | {o.expected} | {o.observed} | {o.rows_lost} | {o.wrong_rows} | "
            f"{o.half_committed} | {'pass' if o.passed else 'FAIL'} |"
        )
    return "\n".join(lines)


def write_result(observations: Sequence[Observation], out: Path) -> None:
    """JSON beside a markdown table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(o) for o in observations], indent=2) + "\n")
    out.with_suffix(".md").write_text(format_table(observations) + "\n")


def prepare(workdir: Path, *, say: Say = print) -> ChaosSetup:
    """A small marketplace (with bad rows) and a tiny model trained on it and made champion, under
    ``workdir`` (about two minutes on two cores)."""
    from catalog_enrichment import registry
    from catalog_enrichment.config import TINY_MODEL, SyntheticConfig, load_config
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.data.synthetic import generate_marketplace
    from catalog_enrichment.training.job import run_training_job

    workdir = workdir.resolve()
    taxonomy = load_taxonomy()
    say(f"chaos: a marketplace and a tiny model under {workdir}")
    labelled = generate_marketplace(
        workdir / "labelled", SyntheticConfig(products=3000, seed=1, image_size=32), taxonomy=taxonomy
    )
    incoming = generate_marketplace(
        workdir / "incoming",
        SyntheticConfig(products=800, seed=7, bad_rate=0.04, image_size=32, days=3),
        taxonomy=taxonomy,
    )
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = load_config(
        environ={},
        overrides={
            "mlflow": {
                "tracking_uri": uri,
                "artifact_location": str(workdir / "mlartifacts"),
                "registered_model": "chaos",
            },
            "catalog": {"root": str(workdir / "train-lake")},
            "model": TINY_MODEL,
            "training": {"epochs": 6, "batch_size": 32, "crossfit_folds": 0},
            "inference": {"device": "cpu"},
        },
    )
    client = registry.configure_mlflow(uri)
    outcome = run_training_job(cfg, taxonomy, data=labelled.products, client=client, progress=lambda m: None)
    registry.set_alias(client, "chaos", registry.CHAMPION, outcome.registered.version)
    return ChaosSetup(workdir, incoming.products, uri, "chaos")
