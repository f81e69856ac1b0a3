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

__all__ = [
    "STORED_COLUMNS",
    "check_fingerprint",
    "embeddings_schema",
    "keep_one_per_product",
    "split_content",
    "stored_content",
]

# the columns a run joins to its products: the stored digest and vector
STORED_COLUMNS = ("stored_content", "stored_embedding")


def stored_content(content: Any, image_digest: Any) -> Any:
    """A stored vector's ``content``: the digest of what the encoders read, then ``@`` and the
    digest of the image bytes read, where there were some (strings, or Spark columns): a run that
    later finds those bytes a placeholder does not fuse the vector. A vector of a product without
    an image, or stored before the digest was kept, has none."""
    if isinstance(content, str) or content is None:
        return content if not image_digest else f"{content}@{image_digest}"
    from pyspark.sql import functions as F

    return F.when(image_digest.isNull(), content).otherwise(F.concat(content, F.lit("@"), image_digest))


def split_content(stored: str) -> tuple[str, str | None]:
    """A stored ``content`` as (the digest of what the encoders read, the image bytes' digest or None)."""
    content, _, image = stored.partition("@")
    return content, image or None


def embeddings_schema() -> pa.Schema:
    return load_contract("embeddings").arrow_schema()


def check_fingerprint(encoder: str) -> str:
    """An encoder fingerprint (hex) - it is written into queries, so nothing else passes."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", encoder):
        raise CatalogEnrichError(f"not an encoder fingerprint: {encoder!r}")
    return encoder


def keep_one_per_product(stored: Any, products: Any = None) -> Any:
    """The store's rows as the join's right side: one per product (``stored_content``,
    ``stored_embedding``), so a duplicated row can never duplicate a scored product; those of
    ``products`` only, where given (a semi-join first, which Spark broadcasts when the run's
    products are few: a night's increment does not shuffle the whole store)."""
    if products is not None:
        stored = stored.join(products.select("product_id").distinct(), "product_id", "left_semi")
    return stored.dropDuplicates(["product_id"]).select(
        "product_id",
        stored["content"].alias(STORED_COLUMNS[0]),
        stored["embedding"].alias(STORED_COLUMNS[1]),
    )
