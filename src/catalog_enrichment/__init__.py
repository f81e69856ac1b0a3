"""catalog-enrichment: fill missing product attributes at a calibrated >= 95 % precision."""

from catalog_enrichment import _compat  # noqa: F401  (must run before torchvision is imported)

__version__ = "0.1.0"
__all__ = ["__version__"]
