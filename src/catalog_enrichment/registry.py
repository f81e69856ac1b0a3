"""Everything MLflow: pyfunc packaging, logging a training run, registering, aliases, the promotion gate.

Only this module, the model's code entry (``pyfunc_model.py``) and the benchmark's MLflow baseline
(``bench/peer.py``) import mlflow. Consumers resolve ``models:/<name>@champion``; training registers a
version (the number comes from the registration call) and points ``challenger`` at it; promotion
moves ``champion`` after the gate, recording every decision as version tags and in an append-only
promotion log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, DataType, Schema

from catalog_enrichment.config import NAME_PATTERN, MLflowConfig
from catalog_enrichment.errors import CatalogEnrichError, UnservableBundle
from catalog_enrichment.inference.bundle import BundleFolder, bundle_problems
from catalog_enrichment.redaction import redact_text, redact_uri, redact_value
from catalog_enrichment.versions import ModelVersion

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "ENCODER_TAG",
    "ROLLED_BACK_TAG",
    "TAG_LIMIT",
    "CatalogEnrichmentPyfunc",
    "FilesGone",
    "TrainingRecord",
    "calibrated_target",
    "check_experiment",
    "check_tracking_server",
    "configure_mlflow",
    "download_artifact_json",
    "download_bundle",
    "json_tag",
    "live_encoders",
    "load_bundle_from_uri",
    "log_and_register",
    "log_audit_run",
    "log_enrichment_run",
    "mark_rolled_back",
    "pip_requirements",
    "resolve_alias",
    "resolve_model",
    "set_alias",
    "tag_version",
    "version_tags",
]

CHAMPION = "champion"
CHALLENGER = "challenger"
# version tag: the bundle's encoder fingerprint (the embedding store's key), set at registration
ENCODER_TAG = "encoder_fingerprint"
# version tag: when and where `rollback --model-version` removed what the version wrote; an alias
# naming such a version is not served (resolve_model), nor is it promoted or compared (promotion)
ROLLED_BACK_TAG = "catalog_enrich.rolled_back"


class CatalogEnrichmentPyfunc(PythonModel):
    """The pyfunc wrapper: artifacts hold a model bundle folder; predict returns one score column per
    ``<attribute>=<value>``. Consumers in this package reach the bundle itself
    (:func:`load_bundle_from_uri` unwraps it; the Spark job ships the bundle folder to its executors
    with ``addArchive``).

    A product without image bytes is read from its ``image_uri`` only under the folders named at
    load time (``mlflow.pyfunc.load_model(uri, model_config={"image_roots": [...]})``; local files
    only); without them, or outside them, its scores are NaN, as the job would quarantine it."""

    def load_context(self, context: Any) -> None:
        import catalog_enrichment  # noqa: F401  (torchvision fix before timm loads)
        from catalog_enrichment.data.images import ImagePolicy
        from catalog_enrichment.inference.bundle import bundle_problems, load_bundle
        from catalog_enrichment.inference.options import PredictorOptions

        problems = bundle_problems(context.artifacts["bundle"])
        if problems:  # a damaged or partly uploaded artifact: never scored, judged or promoted
            raise UnservableBundle(f"the model artifact is damaged: {'; '.join(problems[:3])}")
        self.bundle = load_bundle(context.artifacts["bundle"], device="cpu")
        roots = (context.model_config or {}).get("image_roots") or ()
        self.options = PredictorOptions(image_policy=ImagePolicy(roots=tuple(map(str, roots))))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from catalog_enrichment.inference.predictor import BatchPredictor

        return BatchPredictor(self.bundle, self.options, device="cpu").score_frame(model_input)


def pip_requirements() -> list[str]:
    """Exact versions of what loading the model needs (from the running environment). This package is
    not among them: it travels in the model itself (``code_paths``), so an environment MLflow restores
    never resolves a package of this name from a public index."""
    from importlib.metadata import version

    names = [
        "torch",
        "transformers",
        "tokenizers",
        "timm",
        "pandas",
        "numpy",
        "pyarrow",
        "pillow",
        "simplejpeg",
        "pydantic",
        "pyyaml",
        "scipy",
        "scikit-learn",
        "mlflow",
    ]
    return [f"{n}=={version(n).split('+')[0]}" for n in names]


def configure_mlflow(tracking_uri: str, registry_uri: str | None = None) -> MlflowClient:
    """Point MLflow at the configured stores and return a client (jobs and the CLI call this)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if any(redact_uri(u) != u for u in (tracking_uri, registry_uri or "")):
        # MLflow prints "View run at <tracking URI>/..." with the URI as given, password included
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri or tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def check_tracking_server(client: MlflowClient) -> None:
    """Fail fast, before any training or registration, when the tracking server cannot be reached."""
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:  # requests errors, MlflowException, ...
        raise CatalogEnrichError(
            f"MLflow tracking server {redact_uri(client.tracking_uri)} is unreachable "
            f"({type(exc).__name__}: {redact_text(str(exc).splitlines()[0])[:200]}): start it, or point "
            "mlflow.tracking_uri (MLFLOW_TRACKING_URI) at one that runs; nothing was read or written"
        ) from None


def check_experiment(client: MlflowClient, name: str) -> None:
    """Fail fast, before any training, when experiment ``name`` was deleted (see :func:`_live_experiment`)."""
    _live_experiment(client, name)


def _live_experiment(client: MlflowClient, name: str) -> Any:
    """Experiment ``name``, None when there is none.

    Raises:
        CatalogEnrichError: it was deleted: MLflow keeps a deleted experiment's name, so no run can be
            logged into it nor another one of that name created until it is restored.
    """
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise CatalogEnrichError(
            f"MLflow experiment {name!r} (id {found.experiment_id}) in "
            f"{redact_uri(client.tracking_uri)} is deleted: restore it (mlflow experiments restore "
            f"--experiment-id {found.experiment_id}, with MLFLOW_TRACKING_URI set to that store) or "
            "configure another experiment name; nothing was logged"
        )
    return found


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    found = _live_experiment(client, name)
    if found is not None:
        return str(found.experiment_id)
    location = artifact_location or _beside_the_store(client.tracking_uri)
    return str(client.create_experiment(name, artifact_location=location))


def _beside_the_store(tracking_uri: str) -> str | None:
    """A SQLite store's artifacts go to ``mlartifacts/`` in its folder (MLflow's own default is
    ``./mlruns`` in whatever folder the process runs in); a server decides for itself (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


@dataclass(frozen=True)
class TrainingRecord:
    """What a training run logs beside its model: parameters and tags, metrics per epoch and in
    summary, files (a folder or a file per artifact path) and MLflow tables (viewable in the UI)."""

    params: Mapping[str, Any] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    epoch_metrics: Sequence[Mapping[str, float]] = ()
    summary_metrics: Mapping[str, float] = field(default_factory=dict)
    artifacts: Mapping[str, Path] = field(default_factory=dict)
    tables: Mapping[str, pd.DataFrame] = field(default_factory=dict)


def log_and_register(
    client: MlflowClient,
    mlflow_cfg: MLflowConfig,
    bundle_dir: Path,
    record: TrainingRecord,
    example: tuple[pd.DataFrame, pd.DataFrame],
    version_tags: Mapping[str, str],
) -> ModelVersion:
    """Log a training run (``record`` and the pyfunc model, its signature from ``example``: input
    rows and their scores) into ``mlflow_cfg``'s experiment, register a new version of its
    registered model with ``version_tags`` (and the bundle's :data:`ENCODER_TAG`), created in one
    call with its tags so no version is ever seen half tagged, and then point ``challenger`` at
    it. Nothing is registered if logging fails.

    MLflow logs a model only into its active run (``mlflow.pyfunc.log_model`` has no client form),
    so this one function works through MLflow's process-wide stores, which :func:`configure_mlflow`
    points at the client's; everything else here uses the client it is given.
    """
    registered_model, (input_example, output_example) = mlflow_cfg.registered_model, example
    experiment_id = _experiment_id(client, mlflow_cfg.experiment, mlflow_cfg.artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params({k: str(redact_value(k, v))[:6000] for k, v in record.params.items()})
        mlflow.set_tags({k: redact_value(k, v) for k, v in record.tags.items()})
        for step, metrics in enumerate(record.epoch_metrics, start=1):
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        mlflow.log_metrics({k: float(v) for k, v in record.summary_metrics.items() if np.isfinite(v)})
        for name, path in record.artifacts.items():
            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path=name)
            else:
                mlflow.log_artifact(str(path), artifact_path=name)
        for artifact_file, frame in record.tables.items():
            mlflow.log_table(frame, artifact_file=artifact_file)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"bundle": str(bundle_dir)},
            pip_requirements=pip_requirements(),
            code_paths=[str(Path(__file__).parent)],
            signature=_signature(input_example, output_example),
            input_example=input_example,
            model_config={"image_roots": []},  # what a load may set (CatalogEnrichmentPyfunc)
        )
    encoder = BundleFolder(Path(bundle_dir)).encoder_fingerprint()
    tags = {**version_tags, **({ENCODER_TAG: encoder} if encoder else {})}
    try:
        client.create_registered_model(registered_model)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # waits until the registry says the version is READY (MLflow gives up after five minutes)
    created = client.create_model_version(
        registered_model, info.model_uri, run.info.run_id, tags=tags, model_id=info.model_id
    )
    version = str(created.version)
    client.set_registered_model_alias(registered_model, CHALLENGER, version)
    return ModelVersion(registered_model, version, run.info.run_id)


def _signature(inputs: pd.DataFrame, outputs: pd.DataFrame) -> ModelSignature:
    """The example's signature, with ``image``, ``category`` and ``image_uri`` optional inputs,
    whatever columns the training table had: MLflow passes a pyfunc model only the columns its
    signature names (and drops the others with a warning), and the model reads all three (the
    photo's bytes; the n-grams read the category; a product without image bytes is read from its
    ``image_uri`` under the roots given at load time, else scored NaN: see
    :class:`CatalogEnrichmentPyfunc`)."""
    signature = infer_signature(inputs, outputs)
    kinds = {"image": DataType.binary, "category": DataType.string, "image_uri": DataType.string}
    named = [c for c in signature.inputs.inputs if c.name not in kinds]
    optional = [ColSpec(kind, name, required=False) for name, kind in kinds.items()]
    return ModelSignature(inputs=Schema([*named, *optional]), outputs=signature.outputs)


def resolve_alias(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points at, ``None`` when the alias is not set.

    Raises:
        CatalogEnrichError: the registered model does not exist.
    """
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if _missing(exc):
            raise CatalogEnrichError(
                f"registered model {name!r} does not exist in {redact_uri(mlflow.get_registry_uri())}"
            ) from None
        raise
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if _missing(exc):  # the alias is not set; any other failure (a server down) is not "no champion"
            return None
        raise


def _missing(exc: MlflowException) -> bool:
    """Whether the registry answered that what was asked for does not exist."""
    return "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower()


def live_encoders(client: MlflowClient, name: str) -> dict[str, list[str]] | None:
    """Encoder fingerprint -> the versions of ``name`` using it, over the versions that hold an alias
    (those that serve or may be promoted); a version without the tag never used the embedding store.
    None: ``name`` is not registered yet."""
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as exc:
        if _missing(exc):
            return None
        raise
    live: dict[str, list[str]] = {}
    for version in sorted(set(map(str, aliases.values())), key=int):
        encoder = version_tags(client, name, version).get(ENCODER_TAG)
        if encoder:
            live.setdefault(encoder, []).append(version)
    return live


def set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    client.set_registered_model_alias(name, alias, version)


# the longest model version tag value MLflow stores
TAG_LIMIT = 5000


def tag_version(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    """Set model version tags, each value cut to :data:`TAG_LIMIT` characters (see :func:`json_tag`)."""
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value)[:TAG_LIMIT])


def json_tag(items: Sequence[str], rest: str) -> str:
    """``items`` as a JSON list that fits a tag: where they do not all fit, the last ones make way
    for one item saying how many were left out and where they are (``rest``), so the value is
    still valid JSON."""
    for keep in range(len(items), -1, -1):
        left = len(items) - keep
        text = json.dumps([*items[:keep], *([f"... {left} more ({rest})"] if left else [])])
        if len(text) <= TAG_LIMIT:
            return text
    raise ValueError(f"{rest!r} alone does not fit a tag")


def mark_rolled_back(client: MlflowClient, name: str, version: str, note: str) -> None:
    """Tag ``name`` v``version`` rolled back (:data:`ROLLED_BACK_TAG`, ``note`` saying when and where).

    Raises:
        CatalogEnrichError: the registry is unreachable or has no such version.
    """
    try:
        client.set_model_version_tag(name, version, ROLLED_BACK_TAG, note)
    except MlflowException as exc:
        raise CatalogEnrichError(
            f"cannot mark {name} v{version} rolled back in the registry "
            f"{redact_uri(mlflow.get_registry_uri())}: {str(exc).splitlines()[0][:300]}"
        ) from None


def version_tags(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    return dict(client.get_model_version(name, version).tags)


class FilesGone(UnservableBundle):
    """A registered version whose files the artifact store no longer holds: no run can serve it."""


def load_bundle_from_uri(model_uri: str) -> Any:
    """Load a registered model (e.g. ``models:/name@champion``) and return its :class:`ModelBundle`.

    Raises:
        FilesGone: the artifact store answers that its files do not exist.
        UnservableBundle: its files are damaged, or another version of this package wrote it.
        CatalogEnrichError: it cannot be loaded now (an unreachable store, a server error).
    """
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        gone = exc.error_code == "RESOURCE_DOES_NOT_EXIST"
        raise (FilesGone if gone else CatalogEnrichError)(
            f"cannot load {model_uri}: {str(exc).splitlines()[0]}"
        ) from None
    return model.unwrap_python_model().bundle


def calibrated_target(client: MlflowClient, name: str, version: str) -> float:
    """The precision target model version ``version`` of ``name`` was calibrated for."""
    try:
        run_id = str(client.get_model_version(name, version).run_id)
    except MlflowException:
        raise CatalogEnrichError(f"registered model {name!r} has no version {version!r}") from None
    return float(download_artifact_json(client, run_id, "tables/calibration.json")["target_precision"])


def download_artifact_json(client: MlflowClient, run_id: str, path: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, dst_path=tmp)).read_text())


def resolve_model(client: MlflowClient, model_uri: str) -> ModelVersion:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> the exact version.

    Raises:
        CatalogEnrichError: not a ``models:/`` URI, unknown model, alias not set, unknown version, an
            alias naming a version that was rolled back (:data:`ROLLED_BACK_TAG`).
    """
    rest = model_uri.removeprefix("models:/")
    name, at, pointer = rest.partition("@") if "@" in rest else rest.partition("/")
    alias = pointer if at == "@" else None
    shape = r"[\w-]+" if alias is not None else r"[0-9]+"  # MLflow's alias or version
    if not model_uri.startswith("models:/") or not re.fullmatch(shape, pointer):
        raise CatalogEnrichError(
            f"model URI must look like models:/<name>@<alias> or models:/<name>/<version>, got {model_uri!r}"
        )
    if not re.fullmatch(NAME_PATTERN, name):  # it names the bundle's cache folder
        raise CatalogEnrichError(
            f"model name {name!r} in {model_uri!r} is not valid here: letters, digits and . _ - only"
        )
    if alias is not None:
        version = resolve_alias(client, name, alias)
        if version is None:
            raise CatalogEnrichError(
                f"registered model {name!r} has no {alias!r} alias: train and promote a version first "
                f"(catalog-enrich train; catalog-enrich promote) or pass --model-uri models:/{name}/<version>"
            )
    else:
        version = pointer
        resolve_alias(client, name, CHAMPION)  # raises for an unknown model
    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        raise CatalogEnrichError(f"registered model {name!r} has no version {version!r}") from None
    why = (mv.tags or {}).get(ROLLED_BACK_TAG)
    if alias is not None and why:
        raise CatalogEnrichError(
            f"{name} v{version}, the {alias!r} alias, was rolled back ({why}): it would write what was "
            "removed again. Point the challenger alias at the version to serve and run catalog-enrich "
            f"promote, or name this one (models:/{name}/{version}) to run it anyway"
        )
    return ModelVersion(name, str(mv.version), str(mv.run_id), alias=alias)


def download_bundle(client: MlflowClient, model: ModelVersion, cache_dir: str | Path) -> ModelVersion:
    """``model`` with its bundle folder, downloaded once into ``cache_dir`` (reused by later runs).

    The folder is named ``<name>-v<version>-<run id>``, unique per version, so Spark can ship it to
    executors under that name (``SparkContext.addArchive``). A folder reused is marked used now (it
    and its zip), so that another run's pruning of unused versions leaves it to this run."""
    bundle = Path(cache_dir) / f"{model.name}-v{model.version}-{model.run_id[:12]}"
    if bundle.is_dir():
        if not bundle_problems(bundle):
            for used in (bundle, bundle.parent / f"{bundle.name}.zip"):
                with contextlib.suppress(OSError):  # no zip: never shipped
                    os.utime(used)
            return replace(model, bundle_dir=bundle)
        shutil.rmtree(bundle, ignore_errors=True)  # a damaged cached copy: fetch it again
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=cache_dir) as tmp:
        try:
            uri = client.get_model_version_download_uri(model.name, model.version)
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=tmp, tracking_uri=client.tracking_uri
                )
            )
        except (MlflowException, OSError) as exc:
            raise CatalogEnrichError(
                f"cannot download {model.uri}: {str(exc).splitlines()[0][:300]}. Its artifacts may have "
                "been deleted: promote another version or register this one again"
            ) from None
        folder = BundleFolder.find(local)
        found = None if folder is None else folder.root
        problems = ["the model's weights are missing"] if found is None else bundle_problems(found)
        if problems:
            raise CatalogEnrichError(
                f"the model artifact of {model.uri} is damaged ({'; '.join(problems[:3])}): nothing was "
                "read or written. Promote another version, or register this one again from its training run"
            )
        assert found is not None
        if not bundle.exists():
            found.rename(bundle)  # atomic within the cache folder: a concurrent run sees all or nothing
    return replace(model, bundle_dir=bundle)


def log_enrichment_run(
    client: MlflowClient,
    *,
    experiment: str,
    artifact_location: str | None,
    report: Mapping[str, Any],
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    tags: Mapping[str, str] | None = None,
    files: Sequence[Path] = (),
) -> str:
    """One MLflow run in the enrichment experiment: params, metrics, ``tags`` (what run health
    blocked, and why), the report as JSON and ``files`` (the run health plots)."""
    return _log_run(
        client,
        _experiment_id(client, experiment, artifact_location),
        name=str(report["run_id"]),
        tags={
            "catalog_enrich.run_id": str(report["run_id"]),
            "status": str(report["status"]),
            **(tags or {}),
        },
        params=params,
        metrics=metrics,
        documents={"run_report.json": report},
        files=files,
    )


def log_audit_run(
    client: MlflowClient,
    *,
    experiment: str,
    artifact_location: str | None,
    audit: Mapping[str, Any],
    metrics: Mapping[str, float],
    chart: Path,
) -> str:
    """One MLflow run for a realized-precision audit (metrics, the audit as JSON, its chart), and the
    audited model version tagged with its outcome (``audit_sample``, ``audit_failed``) unless the
    sample is of one run (``run_id``), which judges that run alone. The same audit
    again (same sample, same verdicts, same figures) logs nothing: its run is returned."""
    name, version = str(audit["model_name"]), str(audit["model_version"])
    failed = ",".join(audit["failed"]) or "none"
    digest = hashlib.sha256(json.dumps(audit, sort_keys=True, default=str).encode()).hexdigest()[:32]
    experiment_id = _experiment_id(client, experiment, artifact_location)
    query = f"tags.`catalog_enrich.audit` = '{audit['sample_id']}'"
    same = client.search_runs([experiment_id], f"{query} and tags.`catalog_enrich.audit_digest` = '{digest}'")
    if same:
        return str(same[0].info.run_id)
    run_id = _log_run(
        client,
        experiment_id,
        name=f"audit-{audit['sample_id']}",
        tags={
            "catalog_enrich.audit": str(audit["sample_id"]),
            "catalog_enrich.audit_digest": digest,
            "model": f"{name}/{version}",
            "failed": failed,
        },
        params={"model": f"{name}/{version}", "sample_id": audit["sample_id"], "target": audit["target"]},
        metrics=metrics,
        documents={"audit.json": audit},
        files=[chart],
    )
    if audit.get("run_id") is not None:  # a sample of one run judges that run, not the version
        return run_id
    try:
        client.set_model_version_tag(name, version, "audit_sample", str(audit["sample_id"]))
        client.set_model_version_tag(name, version, "audit_failed", failed)
    except MlflowException:  # a version no longer registered: the run still holds the audit
        pass
    return run_id


def _log_run(
    client: MlflowClient,
    experiment_id: str,
    *,
    name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    documents: Mapping[str, Mapping[str, Any]],
    files: Sequence[Path] = (),
) -> str:
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(experiment_id, run_name=name, tags=dict(tags))
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and np.isfinite(v)
            ],
            params=[Param(k, str(redact_value(k, v))[:6000]) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        for file_name, document in documents.items():
            client.log_dict(run_id, json.loads(json.dumps(dict(document), default=str)), file_name)
        for path in files:
            client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    return str(run_id)
