"""The catalog: products in, attribute values, quarantine rows and run reports out.

Two backends behind one interface (:class:`~catalog_enrichment.catalog.base.Catalog`), chosen by
``catalog.kind``: the embedded lakehouse (Delta tables) and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

from catalog_enrichment.catalog.base import Catalog
from catalog_enrichment.config import CatalogConfig

__all__ = ["Catalog", "open_catalog"]


def open_catalog(cfg: CatalogConfig, *, products: str | Path | None = None) -> Catalog:
    """The configured backend; ``products`` overrides the products table (a path for the
    lakehouse, a ``[schema.]table`` name for PostgreSQL)."""
    if cfg.kind == "postgres":
        from catalog_enrichment.catalog.postgres import PostgresCatalog
        from catalog_enrichment.errors import ConfigError

        if cfg.products is not None:
            raise ConfigError(
                "catalog.products (--products) names a lakehouse table; with catalog.kind postgres the "
                "products table is catalog.postgres.products_table"
            )

        return PostgresCatalog(cfg, products=None if products is None else str(products))
    from catalog_enrichment.catalog.embedded import LakehouseCatalog

    return LakehouseCatalog(cfg, products=products)
