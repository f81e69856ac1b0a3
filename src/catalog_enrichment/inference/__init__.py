"""Batch scoring: the model bundle, the per-batch predictor, the Spark glue, the decision policy."""

from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(setting: str) -> str:
    """``inference.device`` resolved for this process: ``auto`` is CUDA when torch sees a device,
    else the CPU; ``cuda`` where torch sees none is an error (never a silent fall back to the CPU).

    Raises:
        CatalogEnrichError: ``cuda`` asked for and no CUDA device.
    """
    import torch

    from catalog_enrichment.errors import CatalogEnrichError

    if setting == "cuda" and not torch.cuda.is_available():
        raise CatalogEnrichError("inference.device is 'cuda' but torch sees no CUDA device")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting
