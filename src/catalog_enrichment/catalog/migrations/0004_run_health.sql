-- The health checks of every enrichment run (schemas/run_health.yaml): one row per run, scope and check.

CREATE TABLE {schema}.run_health (
    run_id            text NOT NULL,
    scope             text NOT NULL,
    "check"           text NOT NULL,
    status            text NOT NULL CHECK (status IN ('passed', 'failed', 'skipped')),
    mode              text NOT NULL CHECK (mode IN ('warn', 'block')),
    blocked           boolean NOT NULL,
    products          bigint NOT NULL,
    baseline_products bigint NOT NULL,
    statistic         double precision,
    p_value           double precision,
    alpha             double precision,
    observed          double precision,
    expected          double precision,
    message           text,
    model_name        text NOT NULL,
    model_version     text NOT NULL,
    checked_at        timestamptz NOT NULL,
    PRIMARY KEY (run_id, scope, "check")
);
