"""The one name for a registered model version, used from training to the enrichment run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelVersion"]


@dataclass(frozen=True)
class ModelVersion:
    """A registered model version pinned by number (a promotion mid-run cannot mix versions).

    ``run_id`` is the training run that logged it; ``bundle_dir`` is its bundle folder on this
    machine once downloaded (:func:`catalog_enrichment.registry.download_bundle`); ``alias`` the
    alias it was resolved through (None: named by its number).
    """

    name: str
    version: str
    run_id: str = ""
    bundle_dir: Path | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def bundle(self) -> Path:
        """The bundle folder; raises when the version has not been downloaded."""
        if self.bundle_dir is None:
            raise ValueError(f"{self.uri} has no local bundle folder (download_bundle first)")
        return self.bundle_dir
