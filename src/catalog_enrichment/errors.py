"""Exceptions for mistakes a user can fix; the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

__all__ = [
    "CatalogEnrichError",
    "ConfigError",
    "ContractError",
    "DecoderMismatch",
    "TaxonomyError",
    "UnservableBundle",
]


class CatalogEnrichError(Exception):
    """Base class: a user-fixable problem (bad input, bad config), reported without a traceback."""


class ConfigError(CatalogEnrichError):
    """The configuration is missing, malformed, has an unknown key or a wrong type."""


class ContractError(CatalogEnrichError):
    """A data contract (schemas/*.yaml) or a table does not match what is expected."""


class TaxonomyError(ContractError):
    """The taxonomy file is malformed, or data names an attribute/value the taxonomy lacks."""


class UnservableBundle(CatalogEnrichError):
    """A model bundle this version cannot serve: its files are gone or damaged, or another version
    of this package wrote it (an earlier one: retrain; a later one whose loading this one lacks:
    upgrade, ``by_later`` True, as that version serves it)."""

    def __init__(self, message: str, *, by_later: bool = False) -> None:
        super().__init__(message)
        self.by_later = by_later


class DecoderMismatch(UnservableBundle):
    """This machine's image decoder makes other pixels of a bundle's reference photos than its
    training's did (:mod:`catalog_enrichment.data.decoding`): the machine, not the version, cannot
    serve it, and a newer version trained elsewhere would be refused here too."""
