"""How a :class:`~catalog_enrichment.inference.predictor.BatchPredictor` runs, in a module without
torch: the job's driver builds the scoring spec that carries these options, and only the Python
workers, which load the model, import torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from catalog_enrichment.data.images import ImagePolicy

__all__ = ["PredictorOptions"]


@dataclass(frozen=True)
class PredictorOptions:
    """How a ``BatchPredictor`` runs (its device aside): ``inference.*`` and the image policy."""

    batch_size: int = 128
    decode_threads: int = 2
    autocast: bool = False
    channels_last: bool = True
    keep_memory: bool = True
    embedding_store: bool = False
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    # images earlier runs found to be placeholders (``sha256:`` keys of their bytes; ``uri:`` keys
    # match no stored vector): a stored vector of them is not fused
    placeholders: frozenset[str] = frozenset()
