"""The embedding store's table (``schemas/embeddings.yaml``), shared by both backends.

A run reads the rows of its model's encoder fingerprint joined to the products it scores (a Spark
join: the store is never read on the driver) and, after its commit, stores the vectors it computed,
replacing a product's older vector for the same encoders. The store is a cache of what the encoders
would compute again: a failed write costs a later run the encoding, never a wrong value, so it is
not part of the run's commit. ``vacuum`` removes the vectors of encoders no live model version uses.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa

from catalog_enrichment.contracts import load_contract
from catalog_enrichment.errors import CatalogEnrichError

__all__ = ["STORED_COLUMNS", "check_fingerprint", "embeddings_schema", "keep_one_per_product"]

# the columns a run joins to its products: the stored digest and vector
STORED_COLUMNS = ("stored_content", "stored_embedding")


def embeddings_schema() -> pa.Schema:
    return load_contract("embeddings").arrow_schema()


def check_fingerprint(encoder: str) -> str:
    """An encoder fingerprint (hex) - it is written into queries, so nothing else passes."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", encoder):
        raise CatalogEnrichError(f"not an encoder fingerprint: {encoder!r}")
    return encoder


def keep_one_per_product(stored: Any) -> Any:
    """The store's rows as the join's right side: one per product (``stored_content``,
    ``stored_embedding``), so a duplicated row can never duplicate a scored product."""
    return stored.dropDuplicates(["product_id"]).select(
        "product_id",
        stored["content"].alias(STORED_COLUMNS[0]),
        stored["embedding"].alias(STORED_COLUMNS[1]),
    )
