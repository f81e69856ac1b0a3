"""A trained model version on disk: weights (state dict), configs, tokenizer, taxonomy, calibration.

Layout of a bundle folder (what the MLflow pyfunc artifacts hold)::

    weights.pt           state dict of the model (an ensemble's: every member's; no pickled module)
    model.json           model config + tokenizer facts (vocab size, pad id) + image preprocessing
                         + package version + the dtype the calibrated scores are computed in
                         + the version of the colour statistics (models.color; another is refused)
                         + the encoders' fingerprint (the embedding store's key; null when the
                         model cannot use the store) + whether the tokenizer NFKC-normalises
                         first (data.dataset.with_nfkc, applied again on loading) + ``requires``:
                         what loading must see to beyond the config and weights
                         (:data:`LOADER_FEATURES`; a version that knows less refuses the bundle)
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
    decoding.json        a model that reads photos: reference photos and the digest of the pixels
                         its training's image decoder made of them (data.decoding); a machine
                         whose decoder makes other pixels of them is refused
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
from typing import TYPE_CHECKING, Any

from catalog_enrichment import __version__
from catalog_enrichment.calibration import Calibration
from catalog_enrichment.config import ModelConfig, saved_model_config
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.errors import CatalogEnrichError, ConfigError, DecoderMismatch, UnservableBundle

if TYPE_CHECKING:
    import torch

    from catalog_enrichment.data.preprocess import ImagePreprocessing
    from catalog_enrichment.models.model import AnyModel

__all__ = [
    "LOADER_FEATURES",
    "MANIFEST",
    "BundleFolder",
    "ModelBundle",
    "bundle_problems",
    "json_safe",
    "load_bundle",
    "save_bundle",
]

MANIFEST = "manifest.json"
ONNX_DIR = "onnx"  # the exported encoders (models/runtime.py), when the model serves through ONNX
# The calibrated scores are float32 probabilities of float32 logits on every device and under any
# autocast (models/fusion.py); a bundle records it and one that says otherwise is not loaded.
SCORE_DTYPE = "float32"
# What a bundle's model.json may list under ``requires``: what loading must see to beyond the config
# and weights for the model to score as it was calibrated (``tokenizer_nfkc``: the tokenizer
# NFKC-normalises first, which loading applies again where the saved tokenizer does not keep it). A
# version that does not know one refuses the bundle instead of serving it otherwise (versions
# before the list ignore what they do not know).
LOADER_FEATURES = frozenset({"tokenizer_nfkc"})


@dataclass(frozen=True)
class BundleFolder:
    """A bundle folder's layout (the module docstring): the one place that names its files, and the
    parts that read without building the model."""

    root: Path

    @property
    def weights(self) -> Path:
        return self.root / "weights.pt"

    @property
    def meta(self) -> Path:
        return self.root / "model.json"

    @property
    def taxonomy(self) -> Path:
        return self.root / "taxonomy.json"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def onnx(self) -> Path:
        return self.root / ONNX_DIR

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def decoding(self) -> Path:
        return self.root / "decoding.json"

    def check_decoder(self, meta: dict[str, Any] | None = None) -> None:
        """Refuse a machine whose image decoder makes other pixels of the bundle's reference photos
        than its training's did (:mod:`catalog_enrichment.data.decoding`): the thresholds were not
        calibrated on them. A model that reads no photo, or a bundle written before the record,
        passes.

        Raises:
            DecoderMismatch: the decoder differs.
        """
        if not self.decoding.is_file():
            return
        from catalog_enrichment.data.decoding import decoder_problem
        from catalog_enrichment.data.preprocess import ImagePreprocessing

        prep = ImagePreprocessing.from_dict((meta or self.read_meta())["image_preprocessing"])
        record = json.loads(self.decoding.read_text())
        problem = decoder_problem(record, prep.decode_size, prep.interpolation, prep.decode)
        if problem is not None:
            raise DecoderMismatch(f"{self.root} cannot be served on this machine: {problem}")

    def text_encoder(self, i: int) -> Path:
        return self.root / f"text_encoder_{i}"

    def exists(self) -> bool:
        return self.weights.is_file()

    def read_meta(self) -> dict[str, Any]:
        return dict(json.loads(self.meta.read_text()))

    def read_taxonomy(self) -> Taxonomy:
        return Taxonomy.from_dict(json.loads(self.taxonomy.read_text()), source=str(self.root))

    def read_calibration(self) -> Calibration:
        return Calibration.from_dict(json.loads(self.calibration.read_text()))

    def read_model_config(self, meta: dict[str, Any] | None = None) -> ModelConfig:
        """The saved model config (``meta``: ``model.json`` already read).

        Raises:
            UnservableBundle: this version cannot read it (a key it lacks or refuses), or the bundle
                requires what this version's loading does not apply (:data:`LOADER_FEATURES`: a later
                version wrote it).
        """
        meta = self.read_meta() if meta is None else meta
        unknown = sorted(self.requires(meta) - LOADER_FEATURES)
        if unknown:
            raise self.unservable(
                meta,
                f"it was calibrated with {', '.join(unknown)}, which this version does not apply",
                by_later=True,
            )
        try:
            return saved_model_config(meta["model"], source=str(self.meta))
        except ConfigError as exc:
            raise self.unservable(meta, str(exc)) from None

    def requires(self, meta: dict[str, Any]) -> set[str]:
        """What ``meta`` (``model.json``) says loading must apply (:data:`LOADER_FEATURES`).

        Raises:
            UnservableBundle: ``requires`` is not a list of names.
        """
        required = meta.get("requires", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.unservable(meta, f"model.json: requires must be a list of names, not {required!r}")
        return set(required)

    def unservable(
        self, meta: dict[str, Any], problem: str, *, by_later: bool | None = None
    ) -> UnservableBundle:
        """``problem`` loading the bundle, as the error that names the version that wrote it and
        the remedy: a later version (``by_later``; None: the recorded version is later than this
        one) serves it, an earlier one's model is retrained."""
        written = meta.get("package_version")
        later = _later_than_this(written) if by_later is None else by_later
        if not later:
            remedy = "retrain the model (catalog-enrich train)"
        elif written:
            remedy = f"serve it with catalog-enrichment {written} or later"
        else:
            remedy = "serve it with the version that wrote it"
        return UnservableBundle(
            f"{self.root} (written by catalog-enrichment {written or 'an unrecorded version'}; this is "
            f"{__version__}) cannot be loaded: {problem}; {remedy}",
            by_later=later,
        )

    def reads_images(self) -> bool:
        """Whether the model reads the product image (any member's fusion), without loading it."""
        from catalog_enrichment.models.model import needs_image

        return needs_image(self.read_model_config())

    def encoder_fingerprint(self) -> str | None:
        """The encoders' fingerprint without loading the model (None: it cannot use the store)."""
        fingerprint = self.read_meta().get("encoder_fingerprint")
        return str(fingerprint) if fingerprint else None

    @classmethod
    def find(cls, folder: str | Path) -> BundleFolder | None:
        """The bundle inside ``folder`` (an MLflow model's artifacts hold it one level down)."""
        weights = next(Path(folder).rglob("weights.pt"), None)
        return None if weights is None else cls(weights.parent)


@dataclass
class ModelBundle:
    """Everything needed to score products and decide what to write."""

    model: AnyModel
    tokenizer: Any
    taxonomy: Taxonomy
    calibration: Calibration
    model_config: ModelConfig
    evaluation: dict[str, Any]
    # embeddings.vectors.encoder_fingerprint, or None: this model's encoder outputs are never stored
    encoder_fingerprint: str | None = None

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return self.model.preprocessing


def save_bundle(path: str | Path, bundle: ModelBundle) -> Path:
    """Write ``bundle`` as a bundle folder (see the module docstring); its encoder fingerprint is
    computed from the model (``bundle.encoder_fingerprint`` is not read)."""
    import torch

    from catalog_enrichment.data.dataset import normalizes_nfkc
    from catalog_enrichment.data.decoding import decoder_record
    from catalog_enrichment.embeddings.vectors import encoder_fingerprint, storable
    from catalog_enrichment.models import runtime
    from catalog_enrichment.models.color import COLOR_VERSION
    from catalog_enrichment.models.model import needs_image

    model, tokenizer, model_config = bundle.model, bundle.tokenizer, bundle.model_config
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    folder = BundleFolder(root)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fingerprint = (
        encoder_fingerprint(model, tokenizer, model_config.text.max_length)  # type: ignore[arg-type]
        if storable(model)
        else None
    )
    torch.save(state, folder.weights)
    nfkc = normalizes_nfkc(tokenizer)
    folder.meta.write_text(
        json.dumps(
            {
                "model": model_config.model_dump(mode="json"),
                "vocab_size": len(tokenizer),
                "pad_token_id": tokenizer.pad_token_id,
                "text_encoders": len(model.text_encoders),
                "image_preprocessing": model.preprocessing.to_dict(),
                "package_version": __version__,
                "score_dtype": SCORE_DTYPE,
                "color_version": COLOR_VERSION,
                "encoder_fingerprint": fingerprint,
                # a BERT tokenizer rebuilds its normaliser when loaded: loading applies it again
                "tokenizer_nfkc": nfkc,
                "requires": ["tokenizer_nfkc"] if nfkc else [],
            },
            indent=2,
        )
    )
    for i, config in enumerate(model.text_backbone_configs()):
        config.save_pretrained(str(folder.text_encoder(i)))
    if model_config.encoder_runtime == "onnx":
        runtime.export_encoders(model, folder.onnx)
    if needs_image(model_config):
        prep = model.preprocessing
        record = decoder_record(prep.decode_size, prep.interpolation, prep.decode)
        folder.decoding.write_text(json.dumps(record, indent=2))
    tokenizer.save_pretrained(str(folder.tokenizer))
    folder.taxonomy.write_text(json.dumps(bundle.taxonomy.to_dict(), indent=2))
    folder.calibration.write_text(json.dumps(bundle.calibration.to_dict(), indent=2))
    folder.evaluation.write_text(json.dumps(json_safe(bundle.evaluation), indent=2))
    folder.manifest.write_text(json.dumps(_digests(root), indent=2))  # last: it covers the rest
    return root


def _later_than_this(written: object) -> bool:
    """Whether ``written`` (a bundle's recorded ``package_version``) is a later version than this."""
    from packaging.version import InvalidVersion, Version

    try:
        return isinstance(written, str) and Version(written) > Version(__version__)
    except InvalidVersion:
        return False


def _sha256(path: Path) -> str:
    """A file's SHA-256, read in chunks (weights can be large)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): _sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def bundle_problems(path: str | Path) -> list[str]:
    """What is wrong with a bundle folder's files against its manifest: missing or changed files,
    or no manifest at all (empty when it is whole)."""
    folder = BundleFolder(Path(path))
    if not folder.exists():
        return [f"{folder.weights.name} is missing"]
    if not folder.manifest.is_file():
        return [f"{MANIFEST} is missing (its files cannot be checked)"]
    try:
        expected = json.loads(folder.manifest.read_text())
    except ValueError:
        return [f"{MANIFEST} is not JSON"]
    found = _digests(folder.root)
    return [
        f"{name} is {'missing' if name not in found else 'corrupt (checksum differs)'}"
        for name, digest in expected.items()
        if found.get(name) != digest
    ]


def json_safe(x: object) -> Any:
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


def load_bundle(path: str | Path, *, device: torch.device | str = "cpu") -> ModelBundle:
    """Rebuild the model from a bundle folder alone and move it to ``device`` (eval mode).

    Raises:
        CatalogEnrichError: the folder holds no bundle.
        UnservableBundle: this version cannot serve it (another version of this package wrote it:
            its model config, weights, score dtype or colour statistics differ from this one's), or
            this machine's image decoder makes other pixels of its photos than its training's did.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from catalog_enrichment.data.dataset import with_nfkc
    from catalog_enrichment.data.preprocess import ImagePreprocessing
    from catalog_enrichment.models import runtime
    from catalog_enrichment.models.color import COLOR_VERSION
    from catalog_enrichment.models.model import build_model

    folder = BundleFolder(Path(path))
    if not folder.exists():
        raise CatalogEnrichError(f"{folder.root} is not a model bundle (no {folder.weights.name})")
    meta = folder.read_meta()
    if meta.get("score_dtype") != SCORE_DTYPE:
        raise folder.unservable(
            meta,
            f"its thresholds were calibrated on {meta.get('score_dtype') or 'unrecorded'} scores, this "
            f"version scores in {SCORE_DTYPE}",
        )
    model_config = folder.read_model_config(meta)
    colour = meta.get("color_version", 1)  # bundles written before the version was recorded: 1
    if model_config.image.color_features and colour != COLOR_VERSION:
        raise folder.unservable(
            meta,
            f"its model reads colour statistics of version {colour}, this version computes version "
            f"{COLOR_VERSION}",
        )
    folder.check_decoder(meta)
    taxonomy = folder.read_taxonomy()
    text_backbones = [
        AutoConfig.from_pretrained(str(folder.text_encoder(i))) for i in range(meta["text_encoders"])
    ]
    model = build_model(
        model_config,
        taxonomy,
        vocab_size=meta["vocab_size"],
        pad_token_id=meta["pad_token_id"],
        text_backbones=text_backbones or None,
        preprocessing=ImagePreprocessing.from_dict(meta["image_preprocessing"]),
    )
    try:  # strict: weights of another architecture (another version's model code) are refused
        model.load_state_dict(torch.load(folder.weights, map_location="cpu", weights_only=True))
    except RuntimeError as exc:
        raise folder.unservable(meta, " ".join(str(exc).split())[:300]) from None
    model.to(device).eval()
    if model_config.encoder_runtime == "onnx" and torch.device(device).type == "cpu":
        runtime.attach(model, folder.onnx)
    tokenizer = AutoTokenizer.from_pretrained(str(folder.tokenizer))
    # a bundle saved before the list has the mark alone; one saved without either keeps its tokenizer
    nfkc = "tokenizer_nfkc" in folder.requires(meta) if "requires" in meta else meta.get("tokenizer_nfkc")
    if nfkc:
        tokenizer = with_nfkc(tokenizer)
    calibration = folder.read_calibration()
    evaluation = json.loads(folder.evaluation.read_text())
    return ModelBundle(
        model, tokenizer, taxonomy, calibration, model_config, evaluation, meta.get("encoder_fingerprint")
    )
