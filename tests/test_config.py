"""Config: defaults, precedence (flag > env > YAML > defaults) and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from catalog_enrichment.config import AppConfig, load_config, merge_layers, parse_overrides
from catalog_enrichment.errors import CatalogEnrichError, ConfigError
from catalog_enrichment.redaction import redact_text
from tests.conftest import repo_root


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_hold_the_95_percent_promise() -> None:
    cfg = load_config(environ={})
    assert cfg.calibration.target_precision == 0.95
    assert cfg.calibration.confidence == 0.95
    assert cfg.validation.max_invalid_fraction == 0.05
    assert cfg.mlflow.tracking_uri.startswith("sqlite:///")
    assert cfg.catalog.table("products") == str(Path("lakehouse") / "products")


def test_precedence_flag_over_env_over_yaml_over_default(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "inference:\n  batch_size: 16\n  decode_threads: 3\ntraining:\n  epochs: 2\n")
    env = {"CATALOG_ENRICH_INFERENCE__BATCH_SIZE": "32", "CATALOG_ENRICH_TRAINING__SEED": "9"}
    cfg = load_config(path, overrides=parse_overrides(["inference.batch_size=64"]), environ=env)
    assert cfg.inference.batch_size == 64  # flag beats env and YAML
    assert cfg.training.seed == 9  # env beats default
    assert cfg.inference.decode_threads == 3  # YAML beats default
    assert cfg.training.epochs == 2
    assert cfg.training.learning_rate == AppConfig().training.learning_rate  # default


def test_mlflows_own_variables_sit_between_the_yaml_file_and_this_packages_variables(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "mlflow:\n  tracking_uri: sqlite:///from-yaml.db\n")
    mlflow_env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_REGISTRY_URI": "http://registry:5000"}
    cfg = load_config(path, environ=mlflow_env)
    assert (
        cfg.mlflow.tracking_uri == "http://mlflow:5000" and cfg.mlflow.registry_uri == "http://registry:5000"
    )
    ours = {**mlflow_env, "CATALOG_ENRICH_MLFLOW__TRACKING_URI": "http://ours:5000"}
    assert load_config(path, environ=ours).mlflow.tracking_uri == "http://ours:5000"
    flag = parse_overrides(["mlflow.tracking_uri=sqlite:///flag.db"])
    assert load_config(path, overrides=flag, environ=ours).mlflow.tracking_uri == "sqlite:///flag.db"
    assert load_config(path, environ={}).mlflow.tracking_uri == "sqlite:///from-yaml.db"


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "model:\n  fusion: concat\n")
    cfg = load_config(environ={"CATALOG_ENRICH_CONFIG": str(path)})
    assert cfg.model.fusion == "concat"


def test_unset_flags_do_not_clobber_lower_layers(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "synthetic:\n  products: 77\n")
    cfg = load_config(path, overrides={"synthetic": {"products": None, "seed": 3}}, environ={})
    assert (cfg.synthetic.products, cfg.synthetic.seed) == (77, 3)
    assert merge_layers({"a": {"b": 1}}, {"a": {"b": None, "c": 2}}) == {"a": {"b": 1, "c": 2}}


def test_null_unsets_a_field_from_the_file_and_from_set_alike(tmp_path: Path) -> None:
    """What the JDBC error tells a user to do (``jdbc_jar: null`` beside ``jdbc_package``): in the
    file it held only without flags, and ``--set ...=null`` never did."""
    package = "org.postgresql:postgresql:42.7.4"
    path = _yaml(tmp_path, f"catalog:\n  postgres:\n    jdbc_jar: null\n    jdbc_package: {package}\n")
    for flags in ({}, {"catalog": {"root": str(tmp_path)}}):
        assert load_config(path, overrides=flags, environ={}).catalog.postgres.jdbc_jar is None
    unset = parse_overrides(["catalog.postgres.jdbc_jar=null", f"catalog.postgres.jdbc_package={package}"])
    cfg = load_config(overrides=merge_layers(unset, {"catalog": {"root": None}}), environ={})
    assert (cfg.catalog.postgres.jdbc_jar, cfg.catalog.postgres.jdbc_package) == (None, package)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("inference:\n  batch_sise: 8\n", "inference.batch_sise: unknown key"),
        ("inference:\n  batch_size: many\n", "inference.batch_size"),
        ("calibration:\n  target_precision: 1.5\n", "calibration.target_precision"),
        ("colour: red\n", "colour: unknown key"),
        ("model:\n  text:\n    pooling: max\n", "model.text.pooling"),
    ],
)
def test_unknown_key_or_wrong_type_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(_yaml(tmp_path, text), environ={})


def test_bad_environment_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"validation\.max_invalid_fraction"):
        load_config(environ={"CATALOG_ENRICH_VALIDATION__MAX_INVALID_FRACTION": "lots"})


def test_missing_and_malformed_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", environ={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_yaml(tmp_path, "a: [b\n"), environ={})
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(_yaml(tmp_path, "- 1\n- 2\n"), environ={})
    with pytest.raises(ConfigError, match=r"section\.field=value") as info:
        parse_overrides(["batch_size"])
    assert redact_text(str(info.value)) == str(info.value)  # what the CLI prints: nothing taken for a secret


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="multiple of num_attention_heads"):
        load_config(overrides={"model": {"text": {"hidden_size": 30, "num_attention_heads": 4}}}, environ={})
    with pytest.raises(ConfigError, match=r"must be < 0\.9"):
        load_config(overrides={"training": {"test_fraction": 0.5, "calibration_fraction": 0.4}}, environ={})


def test_config_is_frozen() -> None:
    cfg = load_config(environ={})
    with pytest.raises(Exception, match="frozen"):
        cfg.inference.batch_size = 1  # type: ignore[misc]


@pytest.mark.parametrize("name", ["local.yaml", "cluster.yaml", "postgres.yaml"])
def test_example_configs_load(name: str) -> None:
    cfg = load_config(repo_root() / "deploy" / "config" / name, environ={})
    assert cfg.calibration.target_precision == 0.95


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("db_schema", "x; DROP TABLE attributes", "catalog.postgres.db_schema: String should match pattern"),
        ("db_schema", "Upper", "catalog.postgres.db_schema: String should match pattern"),
        ("products_table", 'public."products"', "catalog.postgres.products_table: String should match"),
        ("products_table", "a.b.c", "catalog.postgres.products_table: String should match"),
        ("partition_column", "updated_at desc", "catalog.postgres.partition_column: String should match"),
    ],
)
def test_postgres_identifiers_are_checked_before_they_reach_sql(key: str, value: object, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        load_config(environ={}, overrides={"catalog": {"kind": "postgres", "postgres": {key: value}}})


def test_spark_needs_a_postgres_jdbc_driver() -> None:
    from pydantic import ValidationError

    from catalog_enrichment.config import PostgresConfig

    with pytest.raises(ValidationError, match="set jdbc_jar or jdbc_package"):
        PostgresConfig(jdbc_jar=None)


def test_the_postgres_connection_is_no_config_key() -> None:
    """CATALOG_ENRICH_PG_DSN holds the connection (a secret): read by the catalog, never config."""
    cfg = load_config(environ={"CATALOG_ENRICH_PG_DSN": "host=db password=secret"})
    assert "secret" not in str(cfg.to_flat_dict())


def test_flat_dict_for_mlflow_params() -> None:
    flat = load_config(environ={}).to_flat_dict()
    assert flat["inference.batch_size"] == 128
    assert flat["model.text.pooling"] == "sum"


def test_non_config_environment_variables_are_ignored_but_misspelt_paths_are_errors() -> None:
    env = {
        "CATALOG_ENRICH_HOME": "/opt/x",
        "CATALOG_ENRICH_AIRFLOW_PYTHON": "/x/python",
        "CATALOG_ENRICH_TAXONOMY_PATH": "/t.yaml",
    }
    assert load_config(environ=env).taxonomy_path == "/t.yaml"
    with pytest.raises(ConfigError, match="inferenc"):
        load_config(environ={"CATALOG_ENRICH_INFERENC__BATCH_SIZE": "3"})


def test_inference_settings_name_the_predictor_options() -> None:
    import dataclasses

    from catalog_enrichment.inference.predictor import PredictorOptions

    cfg = load_config(environ={}, overrides={"inference": {"batch_size": 64}})
    options = cfg.inference.predictor_options()
    assert set(options) <= {f.name for f in dataclasses.fields(PredictorOptions)}
    assert options["batch_size"] == 64 and options["keep_memory"] is True


@pytest.mark.parametrize("name", ["../../etc", "a/b", "", "-x", "name with spaces", "x" * 129])
def test_a_model_name_that_would_name_a_path_is_refused(name: str) -> None:
    from catalog_enrichment import registry

    with pytest.raises(ConfigError, match=r"mlflow\.registered_model"):
        load_config(environ={}, overrides={"mlflow": {"registered_model": name}})
    with pytest.raises(CatalogEnrichError, match="is not valid here"):  # before any MLflow call
        registry.resolve_model(None, f"models:/{name}@champion")


@pytest.mark.parametrize(
    "uri", ["models:/m@", "models:/m/", "models:/m/latest", "models:/m@a/b", "models:/m/1/x"]
)
def test_a_model_uri_without_an_alias_or_version_is_refused_before_any_mlflow_call(uri: str) -> None:
    from catalog_enrichment import registry

    with pytest.raises(
        CatalogEnrichError, match=r"must look like models:/<name>@<alias> or models:/<name>/<version>"
    ):
        registry.resolve_model(None, uri)  # type: ignore[arg-type]


def test_env_and_set_values_are_typed_by_their_field_not_by_yaml_1_1() -> None:
    """YAML 1.1 would read 010 as 8, no as False and 2026-11-01 as a date; a string field keeps what
    was written, a number or boolean field converts it, a flow list's items keep their text."""
    env = {
        "CATALOG_ENRICH_MLFLOW__REGISTERED_MODEL": "010",
        "CATALOG_ENRICH_SPARK__APP_NAME": "no",
        "CATALOG_ENRICH_INFERENCE__BATCH_SIZE": "010",
        "CATALOG_ENRICH_INFERENCE__KEEP_MEMORY": "no",
        "CATALOG_ENRICH_IMAGES__HOSTS": "[no, 2026-11-01]",
    }
    cfg = load_config(
        environ=env, overrides=parse_overrides(["training.seed=010", "catalog.root=2026-11-01"])
    )
    assert cfg.mlflow.registered_model == "010" and cfg.spark.app_name == "no"
    assert cfg.inference.batch_size == 10 and cfg.inference.keep_memory is False
    assert cfg.images.hosts == ["no", "2026-11-01"] and cfg.training.seed == 10
    assert cfg.catalog.root == "2026-11-01"


@pytest.mark.timeout(60)
def test_a_path_may_start_at_the_home_folder(tmp_path: Path) -> None:
    """``~`` is the home folder in every path field, from the file, the environment or a flag; a
    weight path from the file is then no longer taken as relative to the file."""
    home = str(Path.home())
    text = (
        "catalog:\n  root: ~/lake\n  labelled: ~/labelled\ntaxonomy_path: ~/taxonomy.yaml\n"
        "model:\n  text:\n    pretrained_path: ~/weights\n  fusion_kwargs:\n"
        "    second_encoder_path: ~/second\nimages:\n  roots: [~/images, /srv/images]\n"
    )
    env = {"CATALOG_ENRICH_PROMOTION__EVAL_DATA": "~/eval"}
    flags = parse_overrides(["training.embedding_cache=~/cache"])
    cfg = load_config(_yaml(tmp_path, text), overrides=flags, environ=env)
    assert cfg.catalog.root == f"{home}/lake" and cfg.catalog.table("products") == f"{home}/lake/products"
    assert cfg.catalog.table("labelled") == f"{home}/labelled"
    assert cfg.taxonomy_path == f"{home}/taxonomy.yaml"
    assert cfg.model.text.pretrained_path == f"{home}/weights"
    assert cfg.model.fusion_kwargs["second_encoder_path"] == f"{home}/second"
    assert cfg.images.roots == [f"{home}/images", "/srv/images"]
    assert cfg.promotion.eval_data == f"{home}/eval" and cfg.training.embedding_cache == f"{home}/cache"


@pytest.mark.timeout(60)
def test_keys_inside_a_free_form_map_keep_their_case_from_the_environment() -> None:
    """A variable's name is case-insensitive but for a Spark conf key below ``spark.conf``, Spark's
    own, kept as written; a fusion's or timm's keyword argument is a Python name (lower case), as
    a shell's upper-case variable writes it."""
    env = {
        "CATALOG_ENRICH_SPARK__CONF__spark.executorEnv.HF_HOME": "/x",
        "CATALOG_ENRICH_Model__Fusion_Kwargs__NUM_HEADS": "2",
        "CATALOG_ENRICH_MODEL__IMAGE__TIMM_KWARGS__DROP_RATE": "0.1",
    }
    cfg = load_config(environ=env)
    assert cfg.spark.conf == {"spark.executorEnv.HF_HOME": "/x"}
    assert cfg.model.fusion_kwargs == {"num_heads": "2"}
    assert cfg.model.image.timm_kwargs == {"drop_rate": "0.1"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("catalog", "lookback_seconds", "inf"),
        ("catalog", "lookback_seconds", "1e12"),
        ("catalog", "lock_wait_seconds", "inf"),
        ("validation", "max_clock_skew_seconds", str(10**12)),
        ("images", "connect_timeout_seconds", "inf"),
        ("images", "timeout_seconds", "1e12"),
        ("images", "host_pause_seconds", "inf"),
    ],
)
def test_a_duration_is_finite_and_at_most_a_year(section: str, field: str, value: str) -> None:
    """An endless or huge duration would fail mid-run (a timedelta or a date out of range)."""
    with pytest.raises(ConfigError, match=rf"{section}\.{field}: Input should be") as info:
        load_config(overrides={section: {field: value}}, environ={})
    assert "\n" not in str(info.value)
    year = load_config(overrides={section: {field: str(366 * 24 * 3600)}}, environ={})
    assert getattr(getattr(year, section), field) == 366 * 24 * 3600
