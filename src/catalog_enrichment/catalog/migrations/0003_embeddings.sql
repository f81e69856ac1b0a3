-- The embedding store (schemas/embeddings.yaml): encoder outputs per (encoder fingerprint, product).

CREATE TABLE {schema}.embeddings (
    encoder    text NOT NULL,
    product_id text NOT NULL,
    content    text NOT NULL,
    embedding  bytea NOT NULL,
    run_id     text NOT NULL,
    written_at timestamptz NOT NULL,
    PRIMARY KEY (encoder, product_id)
);
