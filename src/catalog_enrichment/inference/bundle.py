"""A trained model version on disk: weights (state dict), configs, tokenizer, taxonomy, calibration.

Layout of a bundle folder (what the MLflow pyfunc artifacts hold)::

    weights.pt           state dict of the model (an ensemble's: every member's; no pickled module)
    model.json           model config + tokenizer facts (vocab size, pad id) + image preprocessing
                         + package version + the dtype the calibrated scores are computed in
                         + the encoders' fingerprint (the embedding store's key; null when the
                         model cannot use the store)
    text_encoder_<i>/    the transformers config of text encoder i (its architecture; an ensemble's
                         members' encoders in member order)
    tokenizer/           tokenizer.save_pretrained() (the pretrained model's own, or the trained one)
    onnx/                with model.encoder_runtime: onnx, every encoder's backbone exported to ONNX
                         (models.runtime): CPU serves these graphs, a GPU the weights in weights.pt
    taxonomy.json        the taxonomy the heads were built for
    calibration.json     thresholds, support and bounds per (attribute, value), and the profile
                         the run health checks compare a run with (health.py: held-out scores
                         per attribute, the training products' inputs)
    evaluation.json      the test-split report of the training run
    manifest.json        the SHA-256 of every other file (a corrupt or partial copy is refused)

A bundle is self-contained: loading it reads nothing outside the folder. The text encoders are
rebuilt from their saved configs and the image encoder from its timm name with the saved
preprocessing; all weights come from ``weights.pt``, so the ``pretrained_path`` the model was trained
from (kept in ``model.json`` as a record) need not exist where it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from catalog_enrichment import __version__
from catalog_enrichment.calibration import Calibration
from catalog_enrichment.config import ModelConfig, saved_model_config
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.models import runtime
from catalog_enrichment.models.embedding import encoder_fingerprint, storable
from catalog_enrichment.models.encoders import ImagePreprocessing
from catalog_enrichment.models.model import AnyModel, build_model

__all__ = [
    "MANIFEST",
    "ModelBundle",
    "bundle_problems",
    "json_safe",
    "load_bundle",
    "read_encoder_fingerprint",
    "save_bundle",
]

MANIFEST = "manifest.json"
# The calibrated scores are float32 probabilities of float32 logits on every device and under any
# autocast (models/fusion.py); a bundle records it and one that says otherwise is not loaded.
SCORE_DTYPE = "float32"


@dataclass
class ModelBundle:
    """Everything needed to score products and decide what to write."""

    model: AnyModel
    tokenizer: Any
    taxonomy: Taxonomy
    calibration: Calibration
    model_config: ModelConfig
    evaluation: dict[str, Any]
    # models.embedding.encoder_fingerprint, or None: this model's encoder outputs are never stored
    encoder_fingerprint: str | None = None

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return self.model.preprocessing


def save_bundle(
    path: str | Path,
    *,
    model: AnyModel,
    tokenizer: Any,
    taxonomy: Taxonomy,
    calibration: Calibration,
    model_config: ModelConfig,
    evaluation: dict[str, Any],
) -> Path:
    """Write a bundle folder (see the module docstring)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fingerprint = (
        encoder_fingerprint(model, tokenizer, model_config.text.max_length)  # type: ignore[arg-type]
        if storable(model)
        else None
    )
    torch.save(state, root / "weights.pt")
    (root / "model.json").write_text(
        json.dumps(
            {
                "model": model_config.model_dump(mode="json"),
                "vocab_size": len(tokenizer),
                "pad_token_id": tokenizer.pad_token_id,
                "text_encoders": len(model.text_encoders),
                "image_preprocessing": model.preprocessing.to_dict(),
                "package_version": __version__,
                "score_dtype": SCORE_DTYPE,
                "encoder_fingerprint": fingerprint,
            },
            indent=2,
        )
    )
    for i, config in enumerate(model.text_backbone_configs()):
        config.save_pretrained(str(root / f"text_encoder_{i}"))
    if model_config.encoder_runtime == "onnx":
        runtime.export_encoders(model, root / runtime.ONNX_DIR)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    (root / "taxonomy.json").write_text(json.dumps(taxonomy.to_dict(), indent=2))
    (root / "calibration.json").write_text(json.dumps(calibration.to_dict(), indent=2))
    (root / "evaluation.json").write_text(json.dumps(json_safe(evaluation), indent=2))
    (root / MANIFEST).write_text(json.dumps(_digests(root), indent=2))  # last: it covers the rest
    return root


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def bundle_problems(path: str | Path) -> list[str]:
    """What is wrong with a bundle folder's files against its manifest: missing or changed files,
    or no manifest at all (empty when it is whole)."""
    root = Path(path)
    if not (root / "weights.pt").is_file():
        return ["weights.pt is missing"]
    if not (root / MANIFEST).is_file():
        return [f"{MANIFEST} is missing (its files cannot be checked)"]
    try:
        expected = json.loads((root / MANIFEST).read_text())
    except ValueError:
        return [f"{MANIFEST} is not JSON"]
    found = _digests(root)
    return [
        f"{name} is {'missing' if name not in found else 'corrupt (checksum differs)'}"
        for name, digest in expected.items()
        if found.get(name) != digest
    ]


def json_safe(x: Any) -> Any:
    """Strict-JSON copy: NaN/inf -> None, NumPy scalars/arrays -> Python values."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if hasattr(x, "tolist"):
        return json_safe(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def read_encoder_fingerprint(path: str | Path) -> str | None:
    """The bundle's encoder fingerprint without loading the model (None: it cannot use the store)."""
    fingerprint = json.loads((Path(path) / "model.json").read_text()).get("encoder_fingerprint")
    return str(fingerprint) if fingerprint else None


def load_bundle(path: str | Path, *, device: torch.device | str = "cpu") -> ModelBundle:
    """Rebuild the model from a bundle folder alone and move it to ``device`` (eval mode)."""
    from transformers import AutoConfig, AutoTokenizer

    root = Path(path)
    if not (root / "weights.pt").is_file():
        raise CatalogEnrichError(f"{root} is not a model bundle (no weights.pt)")
    meta = json.loads((root / "model.json").read_text())
    if meta.get("score_dtype") != SCORE_DTYPE:
        raise CatalogEnrichError(
            f"{root}: its thresholds were calibrated on {meta.get('score_dtype') or 'unrecorded'} scores, "
            f"this version scores in {SCORE_DTYPE}; retrain the model (catalog-enrich train)"
        )
    model_config = saved_model_config(meta["model"], source=str(root / "model.json"))
    taxonomy = Taxonomy.from_dict(json.loads((root / "taxonomy.json").read_text()), source=str(root))
    text_backbones = [
        AutoConfig.from_pretrained(str(root / f"text_encoder_{i}")) for i in range(meta["text_encoders"])
    ]
    model = build_model(
        model_config,
        taxonomy,
        vocab_size=meta["vocab_size"],
        pad_token_id=meta["pad_token_id"],
        text_backbones=text_backbones or None,
        preprocessing=ImagePreprocessing.from_dict(meta["image_preprocessing"]),
    )
    model.load_state_dict(torch.load(root / "weights.pt", map_location="cpu", weights_only=True))
    model.to(device).eval()
    if model_config.encoder_runtime == "onnx" and torch.device(device).type == "cpu":
        runtime.attach(model, root / runtime.ONNX_DIR)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    calibration = Calibration.from_dict(json.loads((root / "calibration.json").read_text()))
    evaluation = json.loads((root / "evaluation.json").read_text())
    return ModelBundle(
        model, tokenizer, taxonomy, calibration, model_config, evaluation, meta.get("encoder_fingerprint")
    )
