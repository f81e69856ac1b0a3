"""Model bundles: one numeric contract for the calibrated scores, and what a bundle may not carry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from catalog_enrichment.calibration import AttributeCalibration, Calibration, ValueThreshold
from catalog_enrichment.catalog.lakehouse import read_table
from catalog_enrichment.enrich.run import check_model_fits
from catalog_enrichment.errors import CatalogEnrichError, UnservableBundle
from catalog_enrichment.inference.bundle import (
    MANIFEST,
    BundleFolder,
    ModelBundle,
    bundle_problems,
    load_bundle,
)
from catalog_enrichment.inference.decide import DecisionPolicy
from catalog_enrichment.inference.predictor import BatchPredictor

pytestmark = pytest.mark.timeout(300)

# Scores between 0.996 and 1, thresholds 0.0002 beside each: bf16 has 2^-8 between 0.996 and 1, so
# a bf16 score would land on 0.99609 or 1.0 and cross half of these thresholds.
PROBS = np.array([0.99655, 0.99705, 0.99745, 0.99785, 0.99825, 0.99865, 0.99905, 0.99945, 0.99975])
OFFSETS = np.array([-1, 1] * 5)[: len(PROBS)] * 2e-4  # threshold below (written) / above (not)


def _head_layers(model: nn.Module, names: set[str]) -> dict[str, nn.Linear]:
    """Each attribute's output layer: a Linear named ``...heads.<attribute>``."""
    found = {}
    for path, module in model.named_modules():
        parts = path.split(".")
        if isinstance(module, nn.Linear) and parts[-1] in names and "heads" in parts[-2]:
            found[parts[-1]] = module
    return found


def _pinned(bundle: ModelBundle) -> dict[str, np.ndarray]:
    """Make every multi-label head output fixed logits (zero weights): the known scores PROBS."""
    attrs = {a.name: a for a in bundle.taxonomy}
    heads = _head_layers(bundle.model, set(attrs))
    assert set(heads) == set(attrs)
    pinned = {}
    with torch.no_grad():
        for name, layer in heads.items():
            if attrs[name].kind != "multilabel":
                continue
            n = layer.out_features
            p = np.resize(PROBS, n)
            layer.weight.zero_()
            layer.bias.copy_(torch.from_numpy(np.log(p / (1 - p))).float())
            pinned[name] = p
    assert pinned, "the fixture taxonomy has a multi-label attribute"
    return pinned


def _policy(bundle: ModelBundle, pinned: dict[str, np.ndarray]) -> DecisionPolicy:
    attrs = {}
    for a in bundle.taxonomy.outputs:  # a derived attribute is not pinned: never written
        if a.name in pinned:
            thresholds = pinned[a.name] + np.resize(OFFSETS, len(a.values))
            values = tuple(
                ValueThreshold(v, float(t), 100) for v, t in zip(a.values, thresholds, strict=True)
            )
        else:
            values = tuple(ValueThreshold(v, None, 0) for v in a.values)
        attrs[a.name] = AttributeCalibration(a.name, a.kind, values)
    return DecisionPolicy(bundle.taxonomy, Calibration(0.95, 0.95, "wilson", 20, attrs), bundle.taxonomy)


@pytest.mark.slow
def test_bf16_autocast_and_fp32_score_and_decide_identically_near_one(scoring_bundle: Path, incoming) -> None:  # type: ignore[no-untyped-def]
    products = read_table(incoming.products).slice(0, 40)
    products = products.filter(pa.compute.invert(pa.compute.is_null(products["title"])))
    bundle = load_bundle(scoring_bundle)
    # the fixture exercises autocast: the unpinned model's scores move under bf16
    plain = BatchPredictor(bundle).score_arrow(products).probs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moved = BatchPredictor(bundle).score_arrow(products).probs
    assert max(np.abs(plain[a] - moved[a]).max() for a in plain) > 1e-4

    pinned = _pinned(bundle)
    fp32 = BatchPredictor(bundle).score_arrow(products).probs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = BatchPredictor(bundle).score_arrow(products).probs
    policy = _policy(bundle, pinned)
    merchant: list[set[str]] = [set()] * products.num_rows
    decided = {name: policy.decide(scores, merchant)[0] for name, scores in (("fp32", fp32), ("bf16", bf16))}
    # the known answer: every product gets exactly the values whose threshold sits below its score
    expected = [
        (a.name, v)
        for a in bundle.taxonomy
        if a.name in pinned
        for v, o in zip(a.values, np.resize(OFFSETS, len(a.values)), strict=True)
        if o < 0
    ]
    for name, values in decided.items():
        assert all(sorted((d.attribute, d.value) for d in row) == sorted(expected) for row in values), name
    for a in pinned:
        assert bf16[a].dtype == np.float32
        np.testing.assert_array_equal(bf16[a], fp32[a])


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def _edit_model_json(root: Path, edit) -> None:  # type: ignore[no-untyped-def]
    meta = json.loads((root / "model.json").read_text())
    edit(meta)
    (root / "model.json").write_text(json.dumps(meta))


def test_a_bundle_whose_score_dtype_is_not_float32_is_refused(quick_bundle: Path, tmp_path: Path) -> None:
    root = _copy(quick_bundle, tmp_path)
    assert json.loads((root / "model.json").read_text())["score_dtype"] == "float32"
    _edit_model_json(root, lambda meta: meta.pop("score_dtype"))
    with pytest.raises(CatalogEnrichError, match=r"calibrated on unrecorded scores.*float32"):
        load_bundle(root)
    _edit_model_json(root, lambda meta: meta.update(score_dtype="bfloat16"))
    with pytest.raises(CatalogEnrichError, match="calibrated on bfloat16 scores"):
        load_bundle(root)


def test_a_bundle_of_other_colour_statistics_is_refused(quick_bundle: Path, tmp_path: Path) -> None:
    from catalog_enrichment.models.color import COLOR_VERSION

    root = _copy(quick_bundle, tmp_path)
    assert json.loads((root / "model.json").read_text())["color_version"] == COLOR_VERSION
    _edit_model_json(root, lambda meta: meta.pop("color_version"))  # written before the version
    with pytest.raises(CatalogEnrichError, match=r"colour statistics of version 1.*retrain"):
        load_bundle(root)


def test_timm_kwargs_that_read_files_are_refused(quick_bundle: Path, tmp_path: Path) -> None:
    root = _copy(quick_bundle, tmp_path)
    _edit_model_json(
        root, lambda meta: meta["model"]["image"].update(timm_kwargs={"checkpoint_path": "/etc/x"})
    )
    with pytest.raises(
        UnservableBundle, match=r"model.json: image.timm_kwargs.*\['checkpoint_path'\] not allowed"
    ):
        load_bundle(root)


def test_a_bundle_another_version_wrote_is_unservable_naming_that_version(
    quick_bundle: Path, tmp_path: Path
) -> None:
    """What promotion catches to judge a challenger alone (promotion.py): a model config key this
    version lacks, and weights of another architecture, each name the version that wrote them, and
    the remedy: a later version serves it (promotion then asks for that version), an earlier one's
    model is retrained."""
    root = _copy(quick_bundle, tmp_path)
    _edit_model_json(root, lambda meta: meta.update(package_version="9.9.9"))
    load_bundle(root)  # the version alone is no reason to refuse it
    _edit_model_json(root, lambda meta: meta["model"].update(mixture_of_heads=4))
    later = r"written by catalog-enrichment 9\.9\.9.*mixture_of_heads.*catalog-enrichment 9\.9\.9 or later"
    with pytest.raises(UnservableBundle, match=later) as refused:
        load_bundle(root)
    assert refused.value.by_later  # promotion asks for that version rather than judge the challenger alone
    _edit_model_json(root, lambda meta: meta.update(package_version="0.0.1"))
    with pytest.raises(UnservableBundle, match=r"0\.0\.1.*mixture_of_heads.*retrain the model") as refused:
        load_bundle(root)
    assert not refused.value.by_later
    _edit_model_json(root, lambda meta: meta.update(package_version="9.9.9"))
    with pytest.raises(UnservableBundle, match=r"written by catalog-enrichment 9\.9\.9"):
        BundleFolder(root).reads_images()
    _edit_model_json(root, lambda meta: meta["model"].pop("mixture_of_heads"))
    state = torch.load(root / "weights.pt", weights_only=True)
    first = next(iter(state))
    state[f"renamed.{first}"] = state.pop(first)  # a module another version names differently
    torch.save(state, root / "weights.pt")
    with pytest.raises(UnservableBundle, match=r"written by catalog-enrichment 9\.9\.9.*state_dict.*renamed"):
        load_bundle(root)


def test_a_bundle_that_requires_what_this_version_does_not_apply_is_unservable(
    quick_bundle: Path, tmp_path: Path
) -> None:
    """A later version's loading step (as ``tokenizer_nfkc`` was one) is refused by name, not
    skipped: the model would score otherwise than it was calibrated."""
    root = _copy(quick_bundle, tmp_path)
    # the trained WordPiece tokenizer normalises NFKC first, as a pretrained one is made to
    assert json.loads((root / "model.json").read_text())["requires"] == ["tokenizer_nfkc"]
    _edit_model_json(root, lambda meta: meta.update(package_version="9.9.9"))
    load_bundle(root)
    _edit_model_json(root, lambda meta: meta.update(requires=["tokenizer_nfkc", "text_unidecode"]))
    later = r"9\.9\.9.*with text_unidecode, which this version does not apply.*9\.9\.9 or later"
    with pytest.raises(UnservableBundle, match=later):
        load_bundle(root)
    with pytest.raises(UnservableBundle, match=later):
        BundleFolder(root).reads_images()  # what the job asks before it loads the model
    with pytest.raises(UnservableBundle, match=later):
        check_model_fits(root, BundleFolder(root).read_taxonomy())  # before the run reads anything
    _edit_model_json(root, lambda meta: meta.update(requires="tokenizer_nfkc"))
    with pytest.raises(UnservableBundle, match="requires must be a list of names, not 'tokenizer_nfkc'"):
        load_bundle(root)
    _edit_model_json(root, lambda meta: meta.pop("requires"))  # written before the list
    load_bundle(root)


def test_a_bundle_without_its_manifest_is_not_whole(quick_bundle: Path, tmp_path: Path) -> None:
    root = _copy(quick_bundle, tmp_path)
    assert bundle_problems(root) == []
    (root / "taxonomy.json").write_text("{}")
    assert bundle_problems(root) == ["taxonomy.json is corrupt (checksum differs)"]
    # the MLflow model (serving, spark_udf, the promotion gate) refuses it as the job does
    from types import SimpleNamespace

    from catalog_enrichment.errors import CatalogEnrichError
    from catalog_enrichment.registry import CatalogEnrichmentPyfunc

    with pytest.raises(CatalogEnrichError, match=r"model artifact is damaged: taxonomy\.json is corrupt"):
        CatalogEnrichmentPyfunc().load_context(SimpleNamespace(artifacts={"bundle": str(root)}))
    (root / MANIFEST).unlink()
    assert bundle_problems(root) == [f"{MANIFEST} is missing (its files cannot be checked)"]


def test_a_machine_whose_image_decoder_makes_other_pixels_is_refused(
    quick_bundle: Path,
    tmp_path: Path,
    taxonomy,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """The thresholds were calibrated on the pixels the training's decoder made: a driver or an
    executor whose Pillow decodes the bundle's reference photos otherwise refuses to score."""
    from catalog_enrichment.data.decoding import current_digest
    from tests.data.test_decoding import one_level_off

    root = _copy(quick_bundle, tmp_path)
    assert (root / "decoding.json").is_file()
    load_bundle(root)
    check_model_fits(root, taxonomy)
    one_level_off(monkeypatch)
    try:
        with pytest.raises(UnservableBundle, match=r"decodes them to other pixels.*install the decoders"):
            load_bundle(root)
        with pytest.raises(UnservableBundle, match="decodes them to other pixels"):
            check_model_fits(root, taxonomy)
        (root / "decoding.json").unlink()  # a bundle written before the record: served as before
        load_bundle(root)
    finally:
        current_digest.cache_clear()
