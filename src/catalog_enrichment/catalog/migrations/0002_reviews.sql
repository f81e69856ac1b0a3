-- Human review (schemas/review_samples.yaml, schemas/reviews.yaml): the written values a sample drew,
-- with their stratum's population, and people's verdicts on them.

CREATE TABLE {schema}.review_samples (
    sample_id       text NOT NULL,
    product_id      text NOT NULL,
    attribute       text NOT NULL,
    value           text NOT NULL,
    category        text,
    confidence      double precision,
    model_name      text NOT NULL,
    model_version   text NOT NULL,
    run_id          text NOT NULL,
    stratum_size    bigint NOT NULL,
    stratum_sampled bigint NOT NULL,
    value_size      bigint NOT NULL,
    attribute_size  bigint NOT NULL,
    drawn_at        timestamptz NOT NULL,
    PRIMARY KEY (sample_id, product_id, attribute, value)
);

CREATE TABLE {schema}.reviews (
    sample_id     text NOT NULL,
    product_id    text NOT NULL,
    attribute     text NOT NULL,
    value         text NOT NULL,
    model_version text NOT NULL,
    verdict       text NOT NULL CHECK (verdict IN ('yes', 'no', 'unsure')),
    reviewer      text NOT NULL,
    reviewed_at   timestamptz NOT NULL,
    source_file   text NOT NULL,
    imported_at   timestamptz NOT NULL,
    PRIMARY KEY (sample_id, product_id, attribute, value, reviewer),
    FOREIGN KEY (sample_id, product_id, attribute, value)
        REFERENCES {schema}.review_samples (sample_id, product_id, attribute, value)
);
