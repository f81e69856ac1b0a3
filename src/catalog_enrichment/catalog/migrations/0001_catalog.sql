-- The catalog tables the job owns, in the configured schema ({schema}); the columns follow
-- schemas/attributes.yaml, schemas/quarantine.yaml and schemas/run_report.yaml.

CREATE TABLE {schema}.attributes (
    product_id    text NOT NULL,
    attribute     text NOT NULL,
    value         text NOT NULL,
    confidence    double precision,
    threshold     double precision,
    source        text NOT NULL CHECK (source IN ('model', 'merchant')),
    model_name    text,
    model_version text,
    run_id        text,
    written_at    timestamptz NOT NULL,
    PRIMARY KEY (product_id, attribute, value),
    CHECK (source = 'merchant' OR (run_id IS NOT NULL AND model_version IS NOT NULL))
);
CREATE INDEX attributes_run_id ON {schema}.attributes (run_id) WHERE run_id IS NOT NULL;

-- one row per committed run (and per rollback); seq orders them
CREATE TABLE {schema}.runs (
    seq            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id         text NOT NULL,
    operation      text NOT NULL CHECK (operation IN ('enrich', 'rollback')),
    model_name     text,
    model_version  text,
    committed_at   timestamptz NOT NULL DEFAULT now(),
    rolled_back_at timestamptz,
    UNIQUE (run_id, operation)
);

-- the (product, attribute) pairs each run changed: wrote, replaced or removed model values of
CREATE TABLE {schema}.run_pairs (
    seq        bigint NOT NULL REFERENCES {schema}.runs (seq),
    product_id text NOT NULL,
    attribute  text NOT NULL,
    PRIMARY KEY (seq, product_id, attribute)
);
CREATE INDEX run_pairs_pair ON {schema}.run_pairs (product_id, attribute);

-- the model values each run replaced or removed, as they were: what its rollback puts back
CREATE TABLE {schema}.replaced (
    seq           bigint NOT NULL REFERENCES {schema}.runs (seq),
    product_id    text NOT NULL,
    attribute     text NOT NULL,
    value         text NOT NULL,
    confidence    double precision,
    threshold     double precision,
    model_name    text,
    model_version text,
    run_id        text,
    written_at    timestamptz NOT NULL
);
CREATE INDEX replaced_seq ON {schema}.replaced (seq, product_id, attribute);

CREATE TABLE {schema}.quarantine (
    product_id     text,
    run_id         text NOT NULL,
    reasons        text[] NOT NULL,
    raw            text NOT NULL,
    quarantined_at timestamptz NOT NULL
);
CREATE INDEX quarantine_run_id ON {schema}.quarantine (run_id);

CREATE TABLE {schema}.run_reports (
    run_id                 text PRIMARY KEY,
    status                 text NOT NULL CHECK (status IN ('succeeded', 'failed', 'aborted', 'rolled_back')),
    model_name             text,
    model_version          text,
    "partition"            text,
    started_at             timestamptz NOT NULL,
    finished_at            timestamptz,
    rows_read              bigint NOT NULL,
    rows_valid             bigint NOT NULL,
    rows_quarantined       bigint NOT NULL,
    rows_scored            bigint NOT NULL,
    written_per_attribute  jsonb NOT NULL,
    coverage_per_attribute jsonb NOT NULL,
    stage_seconds          jsonb NOT NULL,
    products_per_second    double precision,
    watermark              timestamptz,
    validation_summary     text
);
