"""Typed, nested configuration, loaded once from YAML + environment + command-line overrides.

Precedence, highest first: command-line flags > ``CATALOG_ENRICH_*`` environment variables >
MLflow's own ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` (for ``mlflow.tracking_uri`` /
``registry_uri``) > the YAML file (``--config`` or ``CATALOG_ENRICH_CONFIG``) > the defaults below.

Environment variables name a field by its path with ``__`` between levels, e.g.
``CATALOG_ENRICH_INFERENCE__BATCH_SIZE=128`` or ``CATALOG_ENRICH_MLFLOW__TRACKING_URI=http://...``;
names are case-insensitive, but the keys of ``spark.conf``, Spark's own, which keep their case
(``CATALOG_ENRICH_SPARK__CONF__spark.executorEnv.HF_HOME=/x``). A path field may start with ``~``
(the home folder), wherever it is set.
A value (here and in ``--set``) is validated against its field's type: ``true``, ``0.9``, ``[a, b]``
work where the field wants them, and a string field keeps ``010`` or ``no`` as written.

Every section is a frozen pydantic model that forbids unknown keys, so a typo or a wrong type is a
:class:`ConfigError` naming the offending key, e.g. ``inference.batch_size: Input should be a valid
integer (got 'many')``.

Over 600 lines because every field and its description live here: this is the configuration reference.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from catalog_enrichment.errors import ConfigError
from catalog_enrichment.redaction import redact_tree
from catalog_enrichment.yamlfile import read_yaml

__all__ = [
    "ENV_PREFIX",
    "NULL",
    "TINY_MODEL",
    "AppConfig",
    "CalibrationConfig",
    "CatalogConfig",
    "ConfigError",
    "HealthConfig",
    "ImageEncoderConfig",
    "ImagesConfig",
    "InferenceConfig",
    "MLflowConfig",
    "ModelConfig",
    "PostgresConfig",
    "PromotionConfig",
    "ReviewConfig",
    "SparkConfig",
    "SyntheticConfig",
    "TextEncoderConfig",
    "TrainingConfig",
    "ValidationConfig",
    "load_config",
    "merge_layers",
    "parse_overrides",
    "saved_model_config",
]

ENV_PREFIX = "CATALOG_ENRICH_"
# Names that become parts of paths and run ids (a registered model's name)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ENV_CONFIG_FILE = ENV_PREFIX + "CONFIG"
# The longest duration a config field takes (a leap year): the watermark and the clock-skew limit
# are dates a run computes with it, and a finite one keeps them in range.
MAX_SECONDS = 366 * 24 * 3600


def _expand_home(value: str) -> str:
    """A path as written, with a leading ``~`` (``~user``) made the home folder, as a shell does."""
    return os.path.expanduser(value) if value.startswith("~") else value


# A path-valued field: ``~/lake`` means the home folder's lake, from the file, the environment or a flag
PathStr = Annotated[str, AfterValidator(_expand_home)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class SparkConfig(_Section):
    """How jobs build their SparkSession (only ``jobs/`` and ``cli.py`` build one)."""

    master: str = Field("local[2]", description="Spark master URL; ignored under spark-submit.")
    app_name: str = Field("catalog-enrichment", description="Spark application name.")
    arrow_max_records_per_batch: int = Field(
        512,
        gt=0,
        description="Rows per Arrow batch handed to Python and per Parquet read batch (images and "
        "stored embeddings make rows large).",
    )
    c1_jit: bool = Field(
        True,
        description="JVMs compile with the C1 JIT only (-XX:TieredStopAtLevel=1, with a 256 MB code cache): "
        "Spark compiles new classes for every query, and C2 would spend on them the cores the Python "
        "workers score with. Under spark-submit the deploy/spark/*.conf files carry it.",
    )
    class_data_sharing: bool = Field(
        True,
        description="The driver JVM maps the classes Spark loads at start from a class-data-sharing "
        "archive (AppCDS) instead of loading and verifying them from the jars: seconds less per job "
        "start. The first session of a JDK and Spark install writes the archive (once, about 15 s) "
        "under ~/.cache/catalog-enrichment/jvm.",
    )
    conf: dict[str, str] = Field(
        default_factory=dict, description="Extra spark.* settings, passed through verbatim (they win)."
    )

    def local_cores(self) -> int:
        """The cores of a ``local``, ``local[N]``, ``local[*]`` or ``local[N,F]`` master (all of this
        machine's for another master)."""
        if "[" not in self.master:
            return 1 if self.master == "local" else os.cpu_count() or 1
        inside = self.master.partition("[")[2].rstrip("]").split(",")[0].strip()
        return (os.cpu_count() or 1) if inside == "*" else max(1, int(inside))


class MLflowConfig(_Section):
    """Where runs and models live. The embedded default is a SQLite store in the working directory."""

    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI.")
    registry_uri: str | None = Field(None, description="Model registry URI; defaults to tracking_uri.")
    artifact_location: PathStr | None = Field(
        None, description="Artifact root for new experiments (default: ./mlartifacts beside the store)."
    )
    experiment: str = Field("catalog-enrichment-training", description="Experiment of training runs.")
    enrichment_experiment: str = Field("enrichment", description="Experiment of enrichment runs.")
    registered_model: str = Field(
        "catalog-enrichment",
        pattern=NAME_PATTERN,
        description="Registered model name (letters, digits, . _ -: it names folders and run ids).",
    )


# Names of PostgreSQL schemas and tables the job creates or reads (unquoted SQL identifiers)
PG_IDENTIFIER = r"^[a-z_][a-z0-9_]{0,62}$"


class PostgresConfig(_Section):
    """The PostgreSQL catalog (``catalog.kind: postgres``). The connection comes only from the
    environment: ``CATALOG_ENRICH_PG_DSN`` (a libpq connection string or URI), else libpq's own
    ``PGHOST``, ``PGPORT``, ``PGDATABASE``, ``PGUSER``, ``PGPASSWORD`` / ``PGPASSFILE``."""

    db_schema: str = Field(
        "catalog_enrichment",
        pattern=PG_IDENTIFIER,
        description="Schema of the tables the job owns (attributes, quarantine, run reports, run log); "
        "created and migrated by the job.",
    )
    products_table: str = Field(
        "products",
        pattern=r"^([a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}$",
        description="The marketplace's products table, [schema.]table (unqualified: in db_schema); it "
        "needs the contract's columns (schemas/products.yaml; merchant_attributes as jsonb).",
    )
    jdbc_jar: PathStr | None = Field(
        "/usr/share/java/postgresql.jar",
        description="PostgreSQL JDBC driver jar for Spark's reads (Debian's libpostgresql-jdbc-java); None "
        "= jdbc_package.",
    )
    jdbc_package: str | None = Field(
        None,
        description="Maven coordinates Spark fetches instead (spark.jars.packages), e.g. "
        "org.postgresql:postgresql:42.7.4; used when jdbc_jar is None.",
    )
    read_partitions: int = Field(8, gt=0, description="JDBC read partitions (numPartitions).")
    partition_column: str = Field(
        "updated_at",
        pattern=PG_IDENTIFIER,
        description="Column the JDBC read splits on (partitionColumn; numeric, date or timestamp, ideally "
        "indexed); its bounds are read from the table for each run.",
    )
    fetch_size: int = Field(1000, gt=0, description="Rows per JDBC round trip (fetchsize).")

    @model_validator(mode="after")
    def _one_driver(self) -> PostgresConfig:
        if self.jdbc_jar is None and self.jdbc_package is None:
            raise ValueError("set jdbc_jar or jdbc_package: Spark needs the PostgreSQL JDBC driver")
        return self


class CatalogConfig(_Section):
    """Where the catalog lives: the embedded lakehouse (tables under ``root``) or PostgreSQL."""

    kind: Literal["lakehouse", "postgres"] = Field(
        "lakehouse",
        description="lakehouse = Delta tables under root; postgres = products read over JDBC and "
        "attributes written into PostgreSQL (the postgres section).",
    )
    root: PathStr = Field(
        "lakehouse",
        description="Lakehouse root directory of the embedded catalog; with postgres, where a run stages "
        "its scores before the write.",
    )
    lock_wait_seconds: float = Field(
        600,
        ge=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        description="How long a run waits for another run (enrich, backfill, rollback) on the same catalog "
        "to finish before it gives up without writing (at most 366 days).",
    )
    lookback_seconds: float = Field(
        3600,
        ge=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        description="An incremental run reads from this long before the last run's watermark, so a "
        "product whose transaction committed after that run started, stamped with an older updated_at, "
        "is still read; the rows the last run read in that stretch are skipped. Longer than the longest "
        "transaction that writes products, and at most 366 days (a full read is --full).",
    )
    products: PathStr | None = Field(None, description="Products table (default: <root>/products).")
    attributes: PathStr | None = Field(None, description="Attributes table (default: <root>/attributes).")
    attribute_changes: PathStr | None = Field(
        None,
        description="What each run changed in the lakehouse attributes table, before and after, which "
        "rollback restores from (default: <root>/attribute_changes).",
    )
    quarantine: PathStr | None = Field(None, description="Quarantine table (default: <root>/quarantine).")
    run_reports: PathStr | None = Field(None, description="Run-report table (default: <root>/run_reports).")
    labelled: PathStr | None = Field(
        None,
        description="Labelled products that `labels` builds and `train` reads (default: <root>/labelled).",
    )
    review_samples: PathStr | None = Field(
        None, description="Written values drawn for human review (default: <root>/review_samples)."
    )
    reviews: PathStr | None = Field(None, description="Imported human verdicts (default: <root>/reviews).")
    run_health: PathStr | None = Field(
        None, description="Every run's health checks (default: <root>/run_health)."
    )
    embeddings: PathStr | None = Field(
        None, description="The embedding store, encoder outputs per product (default: <root>/embeddings)."
    )
    postgres: PostgresConfig = Field(default_factory=PostgresConfig)

    def table(
        self,
        name: Literal[
            "products",
            "attributes",
            "attribute_changes",
            "quarantine",
            "run_reports",
            "labelled",
            "review_samples",
            "reviews",
            "run_health",
            "embeddings",
        ],
    ) -> str:
        """Location of a table: its explicit setting, else ``<root>/<name>``."""
        explicit: str | None = getattr(self, name)
        return explicit if explicit is not None else str(Path(self.root) / name)


class TextEncoderConfig(_Section):
    """A transformers ``AutoModel``: a local path to pretrained weights, or a small config from scratch."""

    pretrained_path: PathStr | None = Field(
        None,
        description="Local transformers folder (config.json, weights, tokenizer) for from_pretrained(): its "
        "own tokenizer is used; None = random init from the fields below and a WordPiece tokenizer "
        "trained on the data.",
    )
    model_type: str = Field("bert", description="transformers model type used when building from config.")
    hidden_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(256, gt=0)
    vocab_size: int = Field(8000, gt=0, description="Size of the WordPiece vocabulary trained on the data.")
    max_length: int = Field(64, gt=0, description="Tokens per product text ([CLS] title [SEP] description).")
    pooling: Literal["cls", "mean", "sum"] = Field("sum", description="How token vectors become one vector.")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TextEncoderConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return self


# timm.create_model arguments that shape the architecture or its preprocessing; none reads a file
TIMM_KWARGS = frozenset(
    {
        "pretrained_cfg_overlay",
        "drop_rate",
        "drop_path_rate",
        "drop_block_rate",
        "global_pool",
        "img_size",
        "output_stride",
    }
)


class ImageEncoderConfig(_Section):
    """A timm backbone created with ``num_classes=0``."""

    name: str = Field(
        "test_byobnet",
        description="timm model name. The default is timm's smallest conv net (0.2 M parameters), fast "
        "enough to train on 2 CPU cores; use e.g. resnet50 with pretrained_path in production.",
    )
    pretrained_path: PathStr | None = Field(
        None,
        description="Local timm state dict (.pth/.pt or .safetensors) for the model named above; None = "
        "random init. Preprocessing (size, interpolation, mean, std) then comes from timm's pretrained "
        "config, which timm_kwargs.pretrained_cfg_overlay can correct for weights trained otherwise.",
    )
    image_size: int | None = Field(
        None,
        gt=0,
        description="Input resolution in pixels; None = the timm pretrained config's with pretrained_path, "
        "else 96.",
    )
    timm_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra timm.create_model kwargs, one of: "
        + ", ".join(sorted(TIMM_KWARGS))
        + " (a bundle's "
        "model.json carries them too: keys that load files, such as checkpoint_path, are refused).",
    )
    pooling: Literal["head", "stages"] = Field(
        "head",
        description="The pooled vector: head = the backbone's own head (global average of the last "
        "feature map); stages = mean and standard deviation over space of every stage's feature map "
        "(timm forward_intermediates), which keeps colour and texture that the last stage pools away.",
    )
    color_features: bool = Field(
        True,
        description="Append colour statistics of the photo's foreground (a soft CIE L*a*b* histogram and "
        "its moments, models/color.py) to the backbone's pooled features: pooled ImageNet features keep "
        "little of a product's colour.",
    )
    close_up: bool = Field(
        False,
        description="Also read the middle of the photo at twice the resolution, for textures a photo "
        "shrunk to image_size loses (melange, lace, a fine stripe): the photo is decoded at twice "
        "image_size, the backbone sees the whole of it shrunk to image_size and its centre (the middle "
        "half of each side) as it was decoded, both in one batch - twice the image encoder's work. "
        "Needs pooling: stages; the stack fusion learns the close-up as a block of its own.",
    )

    @model_validator(mode="after")
    def _close_up_pools_stages(self) -> ImageEncoderConfig:
        if self.close_up and self.pooling != "stages":
            raise ValueError("close_up needs pooling: stages (the close-up is pooled as the whole photo is)")
        return self

    @field_validator("timm_kwargs")
    @classmethod
    def _known_timm_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        refused = sorted(set(value) - TIMM_KWARGS)
        if refused:
            raise ValueError(f"timm_kwargs {refused} not allowed; allowed: {sorted(TIMM_KWARGS)}")
        return value


class EnsembleConfig(_Section):
    """001 §3.4: several models trained apart, served and calibrated as one."""

    members: int = Field(
        1, ge=1, description="Models in the ensemble (1 = no ensemble); member i trains with seed + i."
    )
    fusions: list[str] = Field(
        default_factory=list,
        description="Fusion of member i = fusions[i % len(fusions)]; empty = every member uses model.fusion.",
    )
    combine: Literal["mean", "vote"] = Field(
        "mean",
        description="mean = average the members' probabilities; vote = majority vote (001), as a score: "
        "(members voting for the value + their mean probability) / (members + 1), so votes rank first "
        "and the mean breaks ties. A member votes for a multi-class value it ranks first and for a "
        "multi-label value it scores >= 0.5.",
    )


class ModelConfig(_Section):
    """The multimodal model: two encoders and one fusion method from the registry."""

    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = Field(default_factory=ImageEncoderConfig)
    fusion: str = Field("modality_attention", description="Fusion registry name (see list_fusions()).")
    fusion_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra fusion arguments (second_encoder_path: a path, ~ the home folder).",
    )
    hidden_dim: int = Field(256, gt=0, description="Width of the shared trunk under the heads.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)
    encoder_runtime: Literal["torch", "onnx"] = Field(
        "torch",
        description="What runs the encoders on CPU: torch, or onnx (ONNX Runtime over graphs exported "
        "when training starts and carried in the bundle; several times faster on CPU). onnx needs "
        "training.encoders: frozen, so the thresholds are calibrated on the exported encoders' scores.",
    )

    @field_validator("fusion_kwargs")
    @classmethod
    def _expand_encoder_path(cls, value: dict[str, Any]) -> dict[str, Any]:
        path = value.get("second_encoder_path")
        return {**value, "second_encoder_path": _expand_home(path)} if isinstance(path, str) else value

    def member_configs(self) -> list[ModelConfig]:
        """The config of every ensemble member (one: this model itself)."""
        fusions = self.ensemble.fusions or [self.fusion]
        single = EnsembleConfig()
        return [
            self.model_copy(update={"fusion": fusions[i % len(fusions)], "ensemble": single})
            for i in range(self.ensemble.members)
        ]


# the largest calibration share the automatic rule picks (training/splits.py)
MAX_AUTO_CALIBRATION = 0.30


class NoisePruningConfig(_Section):
    """001 §3.2.1: confident learning finds the labels most likely wrong; they are left out of training."""

    enabled: bool = Field(False, description="Prune suspected label errors before the final training.")
    fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Largest share of each attribute's labelled training products removed: the top of "
        "cleanlab's ranking of label issues (never a label cleanlab does not flag).",
    )
    folds: int = Field(4, ge=2, description="K of the K-fold out-of-fold probabilities cleanlab reads.")


class StreamingConfig(_Section):
    """Training input read in record batches instead of one table in memory (training/stream.py)."""

    enabled: bool = Field(
        False,
        description="Read the labelled table in Arrow record batches, split by a hash of each product's "
        "text (variants together), and shuffle through a buffer: memory no longer grows with the table. "
        "The stack fusion is cross-fitted over it on one process (its embeddings cached a batch at a "
        "time); the other fusions calibrate on a held-out split: no cross-fitting of them, no noise "
        "pruning or ensembles. "
        "pretrain-text reads the products table the same way.",
    )
    batch_rows: int = Field(4096, gt=0, description="Rows per record batch read from the table.")
    shuffle_rows: int = Field(
        20_000, gt=0, description="Rows in the shuffle buffer the training order is drawn from."
    )


class DistributedConfig(_Section):
    """Training on several processes under Spark's TorchDistributor (training/distributed.py)."""

    processes: int = Field(
        1,
        ge=1,
        description="Training processes (DistributedDataParallel ranks: gloo on CPU, nccl on GPU), each "
        "reading its shard of the table; more than 1 needs training.streaming and a SparkSession.",
    )
    local_mode: bool = Field(
        True,
        description="True: the ranks run on the driver's machine; False: one Spark task each on the "
        "executors (a barrier stage).",
    )


class TrainingConfig(_Section):
    """Optimisation and data splits."""

    epochs: int = Field(8, gt=0)
    batch_size: int = Field(64, gt=0)
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warm-up.")
    grad_clip_norm: float = Field(1.0, gt=0)
    seed: int = 0
    early_stopping_patience: int = Field(
        3, ge=0, description="Epochs without validation gain before stopping."
    )
    selection_metric: Literal["r_at_p95", "average_precision"] = Field(
        "r_at_p95",
        description="Validation metric that picks the best epoch (mean over attributes). r_at_p95 is the "
        "business metric; average_precision keeps ranking epochs when the validation labels are noisy "
        "(with more than 5 % of them wrong, no model reaches 95 % precision on them and R@P95 is ~0).",
    )
    validation_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share held out to stop training and shape the thresholds; the stack fusion holds none "
        "(it stops nothing early and chooses out of fold).",
    )
    calibration_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Share of the labelled products held out for calibration; None = chosen for the "
        "data: 600 products, kept between 15 % and 30 % of the table (see training/splits.py).",
    )
    test_fraction: float = Field(0.15, gt=0, lt=1)
    crossfit_folds: int | None = Field(
        None,
        ge=0,
        description="0 = calibrate on a held-out calibration split; K >= 2 = cross-fitted: no calibration "
        "split, the thresholds come from out-of-fold scores of K fold models over the training split "
        "(K + 1 trainings); None = chosen for the data: 3 folds below 10,000 labelled products, else 0 "
        "(see training/splits.py). The final model, trained on all of the training split, is checked on "
        "the validation split at those thresholds; where its writes there miss the target precision, "
        "they rise until it writes no larger share of that split than the fold models did, which "
        "assumes it ranks new products at least as well as they do. The stack "
        "fusion always cross-fits: its folds, 5 when None or 0.",
    )
    encoders: Literal["finetune", "frozen", "last_n"] = Field(
        "finetune",
        description="finetune = train the encoders with the heads; frozen = embed every product once "
        "(cached) and train only the fusion and heads (002's two-stage set-up); last_n = train the top "
        "unfreeze_layers layers of each encoder and keep the rest fixed.",
    )
    unfreeze_layers: int = Field(2, gt=0, description="last_n: layers trained at the top of each encoder.")
    encoder_learning_rate: float | None = Field(
        None,
        gt=0,
        description="Learning rate of pretrained encoder weights (004 §6.3: 2e-5 to 5e-5); None = 3e-5 for "
        "pretrained encoders, learning_rate for encoders trained from scratch. Fusion and heads always "
        "use learning_rate.",
    )
    embedding_cache: PathStr | None = Field(
        None,
        description="frozen: folder of cached product embeddings, keyed on the data and the encoders "
        "(a file unused for 14 days is deleted); None = ~/.cache/catalog-enrichment/embeddings.",
    )

    noise_pruning: NoisePruningConfig = Field(default_factory=NoisePruningConfig)
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    train_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of the training split trained on (a seeded sample; learning curves, 003's "
        "low-label regime); validation, calibration and test splits stay whole.",
    )

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> TrainingConfig:
        if self.crossfit_folds == 1:
            raise ValueError("crossfit_folds must be 0 (off) or at least 2")
        if self.distributed.processes > 1 and not self.streaming.enabled:
            raise ValueError("distributed.processes > 1 needs streaming.enabled (each rank reads its shard)")
        calibration = MAX_AUTO_CALIBRATION if self.calibration_fraction is None else self.calibration_fraction
        held_out = self.validation_fraction + calibration + self.test_fraction
        if held_out >= 0.9:
            raise ValueError(f"validation + calibration + test fractions = {held_out:.2f}; must be < 0.9")
        return self


class CalibrationConfig(_Section):
    """The precision promise: thresholds proven by a lower confidence bound (see calibration.py)."""

    target_precision: float = Field(0.95, gt=0, lt=1)
    confidence: float = Field(0.95, gt=0.5, lt=1, description="One-sided confidence of the bound.")
    scope: Literal["attribute", "value"] = Field(
        "attribute",
        description="What the bound is on: 'attribute' = everything written for an attribute, pooled over "
        "its values (per-value thresholds where a value has evidence, a shared one for the tail); "
        "'value' = every value on its own (strict; a value needs ~59 confident examples to be written).",
    )
    min_support: int = Field(
        20,
        gt=0,
        description="value scope: fewest true calibration examples of a value; attribute scope: fewest "
        "pooled calibration writes before a threshold level is tested.",
    )
    value_floor: float = Field(
        0.90,
        gt=0,
        lt=1,
        description="attribute scope with a validation split: no value's planned threshold goes down to "
        "where its estimated precision is below this (the per-value guard then holds each written value "
        "to the target).",
    )
    shrinkage: float = Field(
        20.0,
        ge=0,
        description="attribute scope: pseudo-count pulling a value's precision curve toward the "
        "attribute's pooled one; values with far fewer examples than this share the pooled threshold.",
    )
    bound: Literal["wilson", "clopper_pearson"] = Field(
        "clopper_pearson",
        description="the one-sided lower bound every test uses: 'clopper_pearson' is exact (the chance of "
        "keeping a level below target is at most 1 - confidence); 'wilson' approximates it and, at a few "
        "hundred writes, can keep one a point or two more often.",
    )

    @model_validator(mode="after")
    def _floor_below_target(self) -> CalibrationConfig:
        if self.value_floor > self.target_precision:
            raise ValueError("value_floor must not exceed target_precision")
        return self


class ReviewConfig(_Section):
    """Human review: the sample people judge and the realized-precision audit of their verdicts."""

    sample_size: int = Field(500, gt=0, description="Written values `review sample` draws (--size).")
    seed: int = Field(
        0, description="Seed of the sample: the same catalog, size and seed draw the same values."
    )
    balance: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of each attribute's (and each value's) sample spread evenly over its values "
        "(categories); the rest goes in proportion to size. 1 = fully balanced (paper 004), "
        "0 = proportional.",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Two-sided confidence of the audit's Wilson intervals."
    )
    min_category_support: int = Field(
        30, gt=0, description="Fewest verdicts before the audit reports an attribute within one category."
    )


class PromotionConfig(_Section):
    """The promotion gate (challenger vs champion on a frozen evaluation set)."""

    eval_data: PathStr | None = Field(
        None, description="Labelled table of the frozen evaluation set (default: <catalog.root>/eval)."
    )
    eval_version: int | None = Field(
        None, ge=0, description="Pinned Delta version (None = current, recorded)."
    )
    max_coverage_loss: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Coverage drop against the champion tolerated on any attribute (absolute share): the "
        "challenger is rejected when its paired coverage change is significantly below minus this.",
    )
    log: PathStr | None = Field(
        None, description="Append-only promotion log table (default: <catalog.root>/promotion_log)."
    )


class InferenceConfig(_Section):
    """Batch scoring."""

    batch_size: int = Field(128, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    autocast: bool = Field(
        False,
        description="bf16 autocast for the encoders on GPU (ignored on CPU). Off by default: the thresholds "
        "were calibrated on float32 encoder outputs, and bf16 ones change decisions near them.",
    )
    decode_threads: int = Field(2, gt=0, description="Threads decoding images/tokenizing ahead of the model.")
    torch_threads: int | None = Field(None, gt=0, description="torch.set_num_threads; None = task's cores.")
    channels_last: bool = Field(
        True, description="Run the image encoder channels-last (faster convolutions on CPU)."
    )
    keep_memory: bool = Field(
        True,
        description="Let the scoring process keep the memory it frees (glibc malloc thresholds) instead "
        "of faulting the forward pass's activations in again every batch; RSS stays at the peak "
        "working set.",
    )
    embedding_store: bool = Field(
        True,
        description="Keep each product's encoder outputs in the catalog's embeddings table and fuse them "
        "again instead of encoding a product whose content and encoders are unchanged (models whose "
        "fusion reads pooled vectors; see docs/enrich.md).",
    )

    def predictor_options(self) -> dict[str, Any]:
        """The ``PredictorOptions`` fields these settings give (device and threads aside)."""
        return self.model_dump(include=_PREDICTOR_OPTIONS)


# InferenceConfig fields that are PredictorOptions fields of the same name
_PREDICTOR_OPTIONS = {
    "batch_size",
    "decode_threads",
    "autocast",
    "channels_last",
    "keep_memory",
    "embedding_store",
}


HealthMode = Literal["warn", "block"]


class HealthConfig(_Section):
    """The run health checks (``health/``, docs/enrich.md "Run health"): what each failed check does
    - ``block`` (the default: the attribute's values are not committed, the rest of the run is, and
    the next runs read its products again) or ``warn`` (reported only; ``report --health --check``
    exits 1 either way) - and the limits they are judged by."""

    score_drift: HealthMode = Field("block", description="The top score's distribution moved.")
    coverage: HealthMode = Field("block", description="The share of products given a value moved.")
    value_mix: HealthMode = Field("block", description="The mix of top values moved.")
    estimated_precision: HealthMode = Field(
        "block", description="The precision estimated for what was written is below the target."
    )
    inputs: HealthMode = Field(
        "block",
        description="The input checks (title length, script, merchant category, descriptions, images, the "
        "photos' colour balance); block keeps every attribute's values out.",
    )
    retries: int = Field(
        3,
        ge=0,
        description="How many later incremental runs read again the products of a run whose checks kept "
        "values out (block), so a broken night's products are filled by the next clean run.",
    )
    false_alarm: float = Field(
        0.01, gt=0, lt=1, description="Share of clean runs that may raise any alarm (split over the checks)."
    )
    min_products: int = Field(50, ge=1, description="Fewer products scored for an attribute: not judged.")
    min_psi: float = Field(
        0.05, ge=0, description="A distribution fails only when its PSI is at least this (and significant)."
    )
    min_share_change: float = Field(
        0.03, ge=0, description="A share fails only when it moved at least this much (and significantly)."
    )

    def modes(self) -> dict[str, str]:
        """Check name (``inputs`` for the input checks) -> warn | block."""
        names = ("score_drift", "coverage", "value_mix", "estimated_precision", "inputs")
        return {name: getattr(self, name) for name in names}


class ValidationConfig(_Section):
    """The products data contract's operational limits."""

    max_invalid_fraction: float = Field(0.05, ge=0, le=1, description="Circuit breaker: abort above this.")
    min_invalid_rows: int = Field(
        10,
        ge=1,
        description="Circuit breaker: abort only where at least this many rows are invalid, so a quiet "
        "night's one bad row among a dozen is quarantined rather than stopping the run.",
    )
    image_retries: int = Field(
        3,
        ge=0,
        description="How many later incremental runs read again a product quarantined only because its "
        "image could not be read (a network error, a 503) or was a placeholder (image_shared), before it "
        "waits for the product to change. A night its image source was out (image_outage_products) is "
        "no attempt.",
    )
    image_outage_products: int = Field(
        10,
        ge=0,
        description="An image source (a URI's scheme, host and port) none of whose photos a run could "
        "use, on at least this many products not read again for their photo whose photo could not be "
        "read or was a placeholder, was out that night: a host down or a CDN serving its outage image "
        "says nothing of those products' photos, so the run spends none of their image_retries. 0: "
        "every such night is an attempt.",
    )
    max_products_per_image: int = Field(
        20,
        ge=0,
        description="The same image bytes (or image_uri) on more products of one run is a placeholder - "
        "a CDN's outage image, a 'no image' tile - not their photo: those products are quarantined "
        "(image_shared) and read again by the next runs. The bytes read from the products' own URLs "
        "are counted again when scored; an image an earlier run found on more products than this (its "
        "report's placeholder_images) is a placeholder again on however few. embeddings --fill and "
        "training apply the same limit; a model that reads no image skips it. 0 turns the rule off.",
    )
    max_title_length: int = Field(300, gt=0)
    max_description_length: int = Field(5000, gt=0)
    max_id_length: int = Field(256, gt=0, description="Longest product_id accepted.")
    max_clock_skew_seconds: int = Field(
        3600,
        ge=0,
        le=MAX_SECONDS,
        description="updated_at later than the run's start plus this (at most 366 days) is quarantined; "
        "a clock or export error; the watermark never passes the run's start either way.",
    )
    earliest_updated_at: dt.date = Field(
        dt.date(2000, 1, 1),
        description="updated_at before this date (YYYY-MM-DD, UTC) is quarantined: a zero or epoch default, "
        "not a real change.",
    )
    great_expectations: bool = Field(
        True,
        description="Validate every run's batch with a Great Expectations checkpoint before anything is "
        "scored (validation/checkpoint.py): the result and Data Docs are stored with the run; a failed "
        "critical expectation stops the run, a failed warning-level one is reported (on | off).",
    )
    gx_project: PathStr | None = Field(
        None,
        description="The GX project (a folder holding gx/) the run's checkpoint, results and Data Docs go "
        "to: your own project; unset: <catalog.root>/gx.",
    )
    min_rows: int = Field(0, ge=0, description="GX (critical): a batch of fewer rows stops the run.")
    max_rows: int | None = Field(
        None, ge=0, description="GX (critical): a batch of more rows stops the run; unset: no bound."
    )
    max_share_increase: float = Field(
        0.2,
        ge=0,
        le=1,
        description="GX: how much larger than among the model's training products the share of products "
        "without an image (critical), without a description or outside the training categories (warning) "
        "may be.",
    )
    health: HealthConfig = Field(default_factory=HealthConfig)

    @property
    def earliest_time(self) -> dt.datetime:
        """``earliest_updated_at``'s first instant, UTC."""
        return dt.datetime.combine(self.earliest_updated_at, dt.time(), dt.UTC)


IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")


class ImagesConfig(_Section):
    """Where and how much the job may read for a product's ``image_uri`` (and its inline bytes)."""

    roots: list[PathStr] = Field(
        default_factory=list,
        description="Folders image_uri files may be read from, besides the products table's own folder "
        "(symlinks are resolved first: a link out of the roots is refused).",
    )
    schemes: list[str] = Field(
        default_factory=lambda: ["file"],
        description="URI schemes allowed: file (local paths), and remote ones only when listed here: "
        "http and https (data/remote.py), object stores such as s3 and gs (fsspec; see hosts).",
    )
    allow_private_addresses: bool = Field(
        False, description="Let http(s) image URIs name loopback, private or link-local hosts."
    )
    hosts: list[str] = Field(
        default_factory=list,
        description="Hosts (http, https) and buckets (s3, gs, ... through fsspec, read with the job's own "
        "credentials) remote image URIs may name. Empty: http(s) from any public host, no object store.",
    )
    connect_timeout_seconds: float = Field(
        3.0,
        gt=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        description="Connect timeout of an http(s) image (at most 366 days).",
    )
    timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        description="Longest wait for an http(s) image, every attempt and backoff together (at most 366 "
        "days).",
    )
    retries: int = Field(
        2, ge=0, description="Retries of an http(s) image after a connection error, timeout, 429 or 5xx."
    )
    host_failures: int = Field(
        5,
        ge=0,
        description="http(s) images of one host in a row that get no answer in time (no connection, a "
        "timeout, no DNS answer, 429 or 5xx to the last retry) before the host is paused: its images are "
        "then read again by the next runs instead of each waiting out its timeout (0: never paused).",
    )
    host_pause_seconds: float = Field(
        60.0,
        gt=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        description="How long a paused host is asked for nothing; then one image tries it again (at most "
        "366 days).",
    )
    formats: list[str] = Field(
        default_factory=lambda: list(IMAGE_FORMATS),
        description="Pillow formats an image may be decoded from; other bytes are undecodable (no other "
        "decoder plugin ever sees merchant bytes). Pillow's names: JPEG, PNG, WEBP, GIF, BMP, TIFF, ...",
    )
    max_bytes: int = Field(20_000_000, gt=0, description="Largest encoded image read (bytes).")
    max_pixels: int = Field(
        40_000_000,
        gt=0,
        description="Largest decoded image (width x height): bigger is a decompression bomb.",
    )
    min_side: int = Field(
        16,
        gt=0,
        description="Smallest image width and height (pixels): a tracking pixel or an icon is no "
        "product photo (image_within_limits).",
    )


class SyntheticConfig(_Section):
    """The synthetic marketplace generator (``catalog-enrich generate``)."""

    products: int = Field(5000, gt=0)
    seed: int = 0
    bad_rate: float = Field(0.0, ge=0, lt=1, description="Share of rows that are injected bad rows.")
    label_noise: float = Field(0.0, ge=0, lt=1, description="Share of labels flipped per attribute.")
    image_size: int = Field(96, ge=16, le=1024)
    format: Literal["delta", "parquet"] = "delta"
    image_files: bool = Field(
        False, description="Write images as files named by image_uri instead of inline bytes."
    )
    days: int = Field(7, gt=0, description="Number of ingest_date partitions.")
    start_date: str = Field("2026-11-01", description="First ingest_date (YYYY-MM-DD).")
    text_color_share: float = Field(0.5, ge=0, le=1, description="Share of products naming a color in text.")
    decoy_share: float = Field(0.3, ge=0, le=1, description="Share of images with a decoy color patch.")
    merchant_share: float = Field(0.2, ge=0, le=1, description="Share of products with merchant values.")
    missing_image_share: float = Field(0.03, ge=0, le=1, description="Legitimate products with no image.")
    missing_description_share: float = Field(0.1, ge=0, le=1)
    long_tail: bool = Field(
        False,
        description="Draw the long-tailed taxonomy (schemas/taxonomy-longtail.yaml: 40 product types, 30 "
        "colors, Zipf frequencies) instead of the default one.",
    )


class AppConfig(_Section):
    """Everything a job needs; ``load_config`` builds it, jobs pass it (or its sections) down."""

    spark: SparkConfig = Field(default_factory=SparkConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    catalog: CatalogConfig = Field(default_factory=CatalogConfig)
    taxonomy_path: PathStr | None = Field(None, description="Taxonomy YAML; None = the packaged default.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    def redacted(self) -> dict[str, Any]:
        """The config as a nested dict with its secrets masked (:mod:`catalog_enrichment.redaction`):
        what ``catalog-enrich config`` prints."""
        return redact_tree(self.model_dump(mode="json"))

    def to_flat_dict(self) -> dict[str, Any]:
        """``{"inference.batch_size": 128, ...}`` with secrets masked — the form logged as MLflow
        params."""
        return _flatten(self.redacted())


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _set_path(tree: dict[str, Any], path: Sequence[str], value: Any, *, source: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])}: is a value, not a section (from {source})")
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_scalar(text: str) -> Any:
    """An environment or ``--set`` value, for pydantic to validate against its field (as
    pydantic-settings does): the text itself - a number or boolean field converts it, a string field
    keeps it as written (``010``, ``no``, ``2026-11-01`` stay strings, never YAML 1.1's 8, False or a
    date) -; a flow list or mapping (``[a, b]``, ``{k: v}``) with its items as strings; None for an
    empty value or ``null``."""
    stripped = text.strip()
    if stripped in ("", "null", "~"):
        return None
    if stripped[0] in "[{":
        try:
            return yaml.load(stripped, Loader=yaml.BaseLoader)  # every scalar a string
        except yaml.YAMLError:
            return text
    return text


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path, "config file", ConfigError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


# Weight paths in a config file are relative to that file (a config ships beside its weights); other
# paths (tables, stores) stay relative to the working directory, as jobs are run from a project root.
_FILE_RELATIVE_PATHS = (
    ("model", "text", "pretrained_path"),
    ("model", "image", "pretrained_path"),
    ("model", "fusion_kwargs", "second_encoder_path"),
)


def _file_relative(tree: dict[str, Any], base: Path) -> dict[str, Any]:
    for path in _FILE_RELATIVE_PATHS:
        node: Any = tree
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(path[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value:
            expanded = _expand_home(value)
            absolute = Path(expanded).is_absolute()
            node[path[-1]] = expanded if absolute else str((base / expanded).resolve())
    return tree


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Config from ``CATALOG_ENRICH_<SECTION>__<KEY>`` (and ``CATALOG_ENRICH_<TOP_LEVEL_KEY>``).

    Other ``CATALOG_ENRICH_*`` variables without ``__`` (the deploy scripts' own settings, such as
    ``CATALOG_ENRICH_HOME``) are not config and are ignored; a ``__`` path is always config, so a
    misspelt key there is an error. Names are case-insensitive, but a key inside ``spark.conf``
    keeps its case (``CATALOG_ENRICH_SPARK__CONF__spark.executorEnv.HF_HOME``).
    """
    tree: dict[str, Any] = {}
    top_level = set(AppConfig.model_fields)
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == _ENV_CONFIG_FILE:
            continue
        path = _field_path(name[len(ENV_PREFIX) :].split("__"))
        if len(path) == 1 and path[0] not in top_level:
            continue
        if not all(path):
            raise ConfigError(f"environment variable {name}: empty key in the path")
        _set_path(tree, path, _parse_scalar(raw), source=name)
    return tree


# Free-form maps whose keys are another system's, case-sensitive (Spark's settings,
# ``spark.executorEnv.<VARIABLE>``): an environment override keeps their keys as written. The keys
# of the other maps (a fusion's or timm's keyword arguments) are Python names, lower case.
_CASED_MAPS = {("spark", "conf")}


def _field_path(parts: Sequence[str]) -> list[str]:
    """An environment variable's path in lower case, but the keys inside ``spark.conf``
    (:data:`_CASED_MAPS`), kept as written."""
    path = [part.lower() for part in parts]
    for i in range(len(path)):
        if tuple(path[: i + 1]) in _CASED_MAPS:
            return path[: i + 1] + list(parts[i + 1 :])
    return path


# MLflow's own variables, honoured as MLflow tools honour them: above the YAML file, below this
# package's CATALOG_ENRICH_MLFLOW__* variables and command-line flags.
_MLFLOW_ENV = {"MLFLOW_TRACKING_URI": "tracking_uri", "MLFLOW_REGISTRY_URI": "registry_uri"}


def _mlflow_env(environ: Mapping[str, str]) -> dict[str, Any]:
    found = {key: environ[name] for name, key in _MLFLOW_ENV.items() if environ.get(name)}
    return {"mlflow": found} if found else {}


class _Null:
    """``--set section.field=null``: the field set to None, as ``field: null`` in the YAML file or
    the environment variable do (a None among the override layers means "flag not given")."""

    def __repr__(self) -> str:
        return "null"


NULL = _Null()


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["inference.batch_size=64", "model.fusion=concat"]`` into a nested dict (an empty or
    ``null`` value: :data:`NULL`)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.field=value")
        value = _parse_scalar(raw)
        _set_path(tree, key.strip().split("."), NULL if value is None else value, source=f"--set {item}")
    return tree


def _nulls_as_none(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: _nulls_as_none(v) if isinstance(v, Mapping) else None if v is NULL else v for k, v in tree.items()
    }


def _describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(part) for part in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
            continue
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{key}: {err['msg']}{shown}")
    return "; ".join(lines)


def saved_model_config(data: Mapping[str, Any], *, source: str) -> ModelConfig:
    """A model config read back from a saved model (a bundle's ``model.json``), checked as a config
    file is: a key it may not hold is a :class:`ConfigError` naming ``source``."""
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid model config in {source}: {_describe(exc)}") from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AppConfig:
    """Build the config: defaults < YAML file < ``CATALOG_ENRICH_*`` env vars < ``overrides``.

    Args:
        path: YAML file; ``None`` falls back to ``$CATALOG_ENRICH_CONFIG`` and then to defaults only.
        overrides: nested dict from command-line flags (see :func:`parse_overrides`); ``None`` values
            are ignored so unset flags do not clobber lower layers.
        environ: environment to read (default ``os.environ``).

    Raises:
        ConfigError: missing/invalid file, unknown key or wrong type, naming the key.
    """
    env = os.environ if environ is None else environ
    if path is None and env.get(_ENV_CONFIG_FILE):
        path = env[_ENV_CONFIG_FILE]
    tree: dict[str, Any] = (
        _file_relative(_read_yaml(Path(path)), Path(path).parent) if path is not None else {}
    )
    tree = _deep_merge(tree, _mlflow_env(env))
    tree = _deep_merge(tree, _env_overrides(env))
    if overrides:  # their None is a flag not given; the file's and the environment's are values
        tree = _nulls_as_none(_deep_merge(tree, merge_layers(overrides)))
    try:
        return AppConfig.model_validate(tree)
    except ValidationError as exc:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid configuration{where}: {_describe(exc)}") from None


def merge_layers(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge nested override dicts, later layers winning; ``None`` values mean "not set"."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _deep_merge(merged, _drop_none(layer))
    return merged


def _drop_none(tree: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            inner = _drop_none(value)
            if inner:
                out[key] = inner
        elif value is not None:
            out[key] = value
    return out


# The smallest model config the package builds (hidden 32, one text layer, 32 px images; trains in
# about a minute on two cores): the model of the benches (chaos, train-scale) and of the tests.
TINY_MODEL: dict[str, Any] = {
    "hidden_dim": 32,
    "dropout": 0.0,
    "fusion": "concat",
    "text": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 500,
        "max_length": 32,
    },
    "image": {"name": "test_byobnet", "image_size": 32},
}
