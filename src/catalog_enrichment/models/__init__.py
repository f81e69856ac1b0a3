"""Encoders (transformers, timm), the fusion registry, heads and the multimodal model."""

from catalog_enrichment.models.fusion import create_fusion, list_fusions, register_fusion

__all__ = ["create_fusion", "list_fusions", "register_fusion"]
