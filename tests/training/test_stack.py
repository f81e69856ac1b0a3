"""The stack fusion: its lexical modality, its closed-form fit and what it serves (known answers)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import EncodedLabels
from catalog_enrichment.embeddings.frozen import Embeddings
from catalog_enrichment.metrics import attribute_average_precision, attribute_r_at_p
from catalog_enrichment.models.fusion import FusionInputs, StackFusion
from catalog_enrichment.models.lexical import as_bags, bag_tfidf, document_frequency, ngram_counts, tfidf
from catalog_enrichment.models.model import MultimodalModel, build_model
from catalog_enrichment.training.splits import FoldPlan
from catalog_enrichment.training.stack import PENALTIES, fit_stack
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(300)

N = 360
WORDS = ["alpha", "bravo", "charlie"]


def _taxonomy(kind: str = "multiclass") -> Taxonomy:
    return Taxonomy.from_dict({"version": 1, "attributes": {"thing": {"kind": kind, "values": WORDS}}})


def _model(taxonomy: Taxonomy) -> MultimodalModel:
    model = build_model(tiny_config(fusion="stack").model, taxonomy, vocab_size=50)
    assert isinstance(model, MultimodalModel) and isinstance(model.fusion, StackFusion)
    return model


def _embeddings(model: MultimodalModel, titles: list[str], image: np.ndarray | None = None) -> Embeddings:
    rng = np.random.default_rng(0)
    fusion = model.fusion
    tensors = {
        "text_pooled": torch.from_numpy(rng.normal(size=(len(titles), fusion.text_dim)).astype(np.float32)),
        "image_pooled": torch.from_numpy(
            image
            if image is not None
            else rng.normal(size=(len(titles), fusion.image_dim)).astype(np.float32)
        ),
        "image_present": torch.ones(len(titles)),
    }
    return Embeddings(tensors, ngram_counts(titles, [None] * len(titles)))


def _fit(model: MultimodalModel, emb: Embeddings, labels: EncodedLabels, taxonomy: Taxonomy) -> Any:
    train = np.arange(len(emb))
    groups = np.arange(len(emb))
    plan = FoldPlan(train, labels, groups, 3, 0)
    return fit_stack(model, emb, plan, taxonomy, say=lambda _m: None)


def test_torch_tfidf_is_the_scipy_tfidf_training_computes() -> None:
    titles = ["red cotton shirt", "blue denim jeans", "red wool sweater", "shirt"]
    counts = ngram_counts(titles, ["soft", None, "warm", ""])
    vocabulary, idf = document_frequency(counts)
    expected = tfidf(counts, vocabulary, idf).toarray()
    rows = torch.full((1 << 20,), -1, dtype=torch.long)
    rows[torch.from_numpy(vocabulary)] = torch.arange(vocabulary.size)
    bags = as_bags(counts)
    row, weight = bag_tfidf(bags, rows, torch.from_numpy(idf))
    got = torch.nn.functional.embedding_bag(
        row, torch.eye(vocabulary.size), bags[2], mode="sum", per_sample_weights=weight
    ).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_the_vocabulary_keeps_the_most_frequent_buckets_up_to_its_cap() -> None:
    """Buckets in two or more rows; beyond the cap the most frequent (ties to the lower bucket), in
    bucket order, with the inverse document frequencies they have uncapped."""
    from scipy.sparse import csr_matrix

    # bucket: rows it is in -> 7: 4, 3: 3, 9: 3, 5: 2, 1: 1 (below MIN_DF)
    rows = {7: [0, 1, 2, 3], 3: [0, 1, 2], 9: [1, 2, 3], 5: [0, 3], 1: [2]}
    r = [i for b in rows for i in rows[b]]
    c = [b for b in rows for _ in rows[b]]
    counts = csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(4, 1 << 20))
    vocabulary, idf = document_frequency(counts)
    assert vocabulary.tolist() == [3, 5, 7, 9]
    capped, capped_idf = document_frequency(counts, max_vocabulary=3)
    assert capped.tolist() == [3, 7, 9]  # 5 is the least frequent; 3 and 9 tie and both fit
    np.testing.assert_array_equal(capped_idf, idf[[0, 2, 3]])
    assert document_frequency(counts, max_vocabulary=2)[0].tolist() == [3, 7]  # the tie to the lower bucket


def _full_width(text: str) -> str:
    """ASCII as a Japanese keyboard's full-width forms (U+FF01-FF5E, U+3000 for the space)."""
    return "".join("\u3000" if c == " " else chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def test_ngrams_of_full_width_and_ligature_text_are_those_of_its_plain_twin_under_nfkc() -> None:
    assert _full_width("Blue shirt") == "Ｂｌｕｅ\u3000ｓｈｉｒｔ"
    plain = (["Blue shirt", "fine silk scarf"], ["Soft cotton", None], ["Tops", "Accessories"])
    typed = (
        [_full_width("Blue shirt"), "ﬁne silk scarf"],  # full-width forms; a ligature
        [_full_width("Soft cotton"), None],
        [_full_width("Tops"), "Accessories"],
    )
    assert (ngram_counts(*typed, nfkc=True) != ngram_counts(*plain)).nnz == 0
    assert (ngram_counts(*typed) != ngram_counts(*plain)).nnz > 0  # as typed, other n-grams


def test_a_stack_built_here_counts_nfkc_ngrams_and_one_saved_without_the_mark_counts_them_as_typed() -> None:
    model = _model(_taxonomy())
    assert model.fusion.nfkc
    state = model.state_dict()
    again = _model(_taxonomy())
    again.load_state_dict(state)
    assert again.fusion.nfkc  # the mark travels with the weights
    del state["fusion.lex_nfkc"]
    older = _model(_taxonomy())
    older.load_state_dict(state)  # strict: weights saved before the mark still load
    assert not older.fusion.nfkc
    assert not build_model(tiny_config().model, _taxonomy(), vocab_size=50).fusion.nfkc  # no n-grams


def test_a_fitted_stack_records_how_the_ngrams_it_was_fitted_on_were_counted() -> None:
    """Serving counts the n-grams as the fit's were counted, whatever the model was built with."""
    import dataclasses

    taxonomy = _taxonomy()
    y = np.arange(60) % 3
    titles = [f"new {WORDS[v]}" for v in y]
    for nfkc in (False, True):
        model = _model(taxonomy)
        model.fusion.lex_nfkc.fill_(not nfkc)
        embeddings = dataclasses.replace(_embeddings(model, titles), lexical_nfkc=nfkc)
        _fit(model, embeddings, EncodedLabels({"thing": y}, {"thing": y >= 0}), taxonomy)
        assert model.fusion.nfkc is nfkc


@pytest.mark.slow
def test_the_ngram_modality_learns_a_label_that_is_a_keyword_of_the_title() -> None:
    taxonomy = _taxonomy()
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, N)
    filler = ["nice", "new", "classic", "summer", "daily"]
    titles = [f"{rng.choice(filler)} {WORDS[v]} {rng.choice(filler)}" for v in y]
    model = _model(taxonomy)
    fit = _fit(model, _embeddings(model, titles), EncodedLabels({"thing": y}, {"thing": y >= 0}), taxonomy)
    # the encoders' vectors are noise: the keyword is all there is, and the stack finds it
    assert attribute_r_at_p(fit.oof.probs["thing"], y, "multiclass").pooled > 0.95
    assert fit.mix["thing"]["ngrams"] > max(fit.mix["thing"][b] for b in ("text", "image", "colour"))


def test_an_attribute_no_product_is_labelled_for_trains_and_writes_nothing() -> None:
    """A new attribute of the taxonomy, no labels yet: the stack trains the others and gives it the
    blocks' mean, which nothing calibrates."""
    from catalog_enrichment.training.evaluation import calibrate, evaluate

    spec = {"version": 1, "attributes": {"thing": {"kind": "multiclass", "values": WORDS},
                                         "new": {"kind": "multiclass", "values": ["a", "b"]}}}  # fmt: skip
    taxonomy = Taxonomy.from_dict(spec)
    rng = np.random.default_rng(3)
    y, none = rng.integers(0, 3, 120), np.full(120, -1)
    labels = EncodedLabels({"thing": y, "new": none}, {"thing": y >= 0, "new": none >= 0})
    model = _model(taxonomy)
    fit = _fit(model, _embeddings(model, [WORDS[v] for v in y]), labels, taxonomy)
    assert fit.mix["new"] == pytest.approx(dict.fromkeys(fit.mix["new"], 1 / len(fit.mix["new"])))
    calibration = calibrate(fit.oof, labels, taxonomy, tiny_config().calibration)
    assert np.isnan(calibration.thresholds("new")).all()
    report = evaluate(fit.oof, labels, taxonomy, calibration)
    assert report["new"]["macro_f1"] == 0.0 and report["thing"]["r_at_p95"] > 0.9


def test_values_people_confirmed_train_the_stack_where_no_label_is() -> None:
    """Half the products have a label and a title that says nothing ("item"); the other half no
    label, a title that is their value's keyword, and a verdict: people confirmed that value (and
    rejected another for some). The confirmed values train the stack as labels: it finds the
    keyword, which no label teaches."""
    taxonomy = _taxonomy()
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 180)
    judged = np.arange(90, 180)
    verdicts = np.zeros((180, 3), np.int8)
    verdicts[judged, y[judged]] = 1
    verdicts[judged[:30], (y[judged[:30]] + 1) % 3] = -1
    given = np.where(np.arange(180) < 90, y, -1)
    labels = EncodedLabels({"thing": given}, {"thing": given >= 0}, {"thing": verdicts})
    titles = ["item"] * 90 + [WORDS[v] for v in y[judged]]
    model = _model(taxonomy)
    said: list[str] = []
    plan = FoldPlan(np.arange(180), labels, np.arange(180), 3, 0)
    fit = fit_stack(model, _embeddings(model, titles), plan, taxonomy, say=said.append)
    assert attribute_average_precision(fit.oof.probs["thing"][judged], y[judged], "multiclass") > 0.95
    expected = "stack: thing: 90 values people confirmed train as labels; 30 of their verdicts do not"
    assert any(line.startswith(expected) for line in said)


def test_a_product_whose_vector_is_not_finite_stands_at_the_blocks_mean() -> None:
    """One NaN and one infinite image vector: the others' standardisation and the fit are as
    without them (a NaN turned every product's feature NaN and failed the fit)."""
    taxonomy = _taxonomy()
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 90)
    labels = EncodedLabels({"thing": y}, {"thing": y >= 0})
    model = _model(taxonomy)
    emb = _embeddings(model, [WORDS[v] for v in y])
    emb.tensors["image_pooled"][3] = float("nan")
    emb.tensors["image_pooled"][7, 0] = float("inf")
    said: list[str] = []
    plan = FoldPlan(np.arange(90), labels, np.arange(90), 3, 0)
    fit = fit_stack(model, emb, plan, taxonomy, say=said.append)
    assert all(np.isfinite(p).all() for p in fit.oof.probs.values())
    assert "stack: 2 training products' image vectors are not finite: they count as the block's mean" in said
    ok = np.setdiff1d(np.arange(90), [3, 7])
    split = model.fusion.dims["image"]
    mean = emb.tensors["image_pooled"][ok, :split].numpy().mean(axis=0)
    np.testing.assert_allclose(model.fusion.image_mean.numpy(), mean, rtol=1e-5, atol=1e-6)


def test_a_value_in_one_group_only_is_named_unlearned() -> None:
    """The value "charlie" is on one group of 5 variants only: the fold that holds them is scored
    by the fold model whose rows never had it (its logit fixed at -20), while the served mean of
    the fold models learned it - so no out-of-fold score says how the served model scores it. The
    stack names it (its penalties, both the other folds' and the first fold's, recorded beside)."""
    taxonomy = _taxonomy()
    rng = np.random.default_rng(6)
    y = np.where(np.arange(90) < 5, 2, rng.integers(0, 2, 90))
    labels = EncodedLabels({"thing": y}, {"thing": y >= 0})
    model = _model(taxonomy)
    groups = np.where(np.arange(90) < 5, 0, np.arange(90))
    said: list[str] = []
    plan = FoldPlan(np.arange(90), labels, groups, 3, 0)
    fit = fit_stack(model, _embeddings(model, [WORDS[v] for v in y]), plan, taxonomy, say=said.append)
    assert fit.unlearned == {"thing": ("charlie",)}
    assert any(line.startswith("stack: thing: charlie: scored out of fold by a fold model") for line in said)
    assert fit.oof.probs["thing"][:5, 2].max() < 1e-3  # its own products, scored by the fold model
    for block, (c, c_first) in fit.penalties["thing"].items():
        assert c in PENALTIES and c_first in PENALTIES
        logged = f"stack: thing / {block}: C {c:g} (first fold {c_first:g}),"
        assert any(line.startswith(logged) for line in said)


def test_the_calibration_keeps_the_values_the_stack_names_unlearned_out() -> None:
    """Every product scored right and sure: each value shares the proven threshold, but the one
    the stack named unlearned is never written, its reason recorded."""
    from catalog_enrichment.config import CalibrationConfig
    from catalog_enrichment.training.evaluation import Predictions
    from catalog_enrichment.training.stack import UNLEARNED
    from catalog_enrichment.training.trained import HeldOut

    taxonomy = _taxonomy()
    y = np.arange(3000) % len(WORDS)
    probs = np.full((y.size, len(WORDS)), 0.01 / (len(WORDS) - 1), np.float32)
    probs[np.arange(y.size), y] = 0.99
    scored = (Predictions({"thing": probs}, None, {}), EncodedLabels({"thing": y}, {"thing": y >= 0}))
    charlie = WORDS[2]
    heldout = HeldOut(scored, None, scored, unlearned={"thing": (charlie,)})
    values = {
        v.value: v for v in heldout.calibrate(taxonomy, CalibrationConfig(), None).attributes["thing"].values
    }
    assert all(v.threshold is not None for name, v in values.items() if name != charlie)
    assert values[charlie].threshold is None and values[charlie].reason == UNLEARNED


@pytest.mark.parametrize("why", ["unlearned", "unseen"])
def test_the_values_left_without_the_unlearned_or_unseen_ones_must_prove_the_target_alone(why: str) -> None:
    """Multi-label: "alpha" is on every product (its 1,500 sure writes right) and the stack named it
    unlearned (or unseen: no training product carried it, while a calibration split may); "bravo"
    writes 300, 95 % right. Together they proved the target; bravo alone does not (its lower bound is
    under 0.95), so nothing of the attribute is written."""
    from catalog_enrichment.config import CalibrationConfig
    from catalog_enrichment.training.evaluation import Predictions
    from catalog_enrichment.training.stack import UNLEARNED
    from catalog_enrichment.training.trained import UNSEEN, HeldOut

    taxonomy = _taxonomy("multilabel")
    n = 1500
    probs = np.full((n, 3), 0.01, np.float32)
    targets = np.zeros((n, 3), np.float32)
    probs[:, 0], targets[:, 0] = 0.99, 1.0
    probs[:300, 1], targets[:285, 1] = 0.95, 1.0
    scored = (
        Predictions({"thing": probs}, None, {}),
        EncodedLabels({"thing": targets}, {"thing": np.ones(n, bool)}),
    )
    together = HeldOut(scored, None, scored).calibrate(taxonomy, CalibrationConfig(), None)
    assert together.attributes["thing"].values[1].threshold is not None
    out = {"thing": ("alpha",)}
    heldout = (
        HeldOut(scored, None, scored, unlearned=out)
        if why == "unlearned"
        else HeldOut(scored, None, scored, unseen=out)
    )
    alone = heldout.calibrate(taxonomy, CalibrationConfig(), None)
    alpha, bravo, _ = alone.attributes["thing"].values
    assert alpha.threshold is None and alpha.reason == (UNLEARNED if why == "unlearned" else UNSEEN)
    assert bravo.threshold is None and bravo.reason is not None and "prove a lower bound of" in bravo.reason


def test_a_value_some_fold_model_never_learned_but_scores_is_named() -> None:
    """Known answers over three folds of three rows: a value whose products all sit in one fold
    (softmax and one-vs-rest), and - one-vs-rest - one on every product but one fold's."""
    from catalog_enrichment.training.stack import _Target, _unlearned

    folds = [(np.setdiff1d(np.arange(9), out), out) for out in np.arange(9).reshape(3, 3)]
    y = np.array([2, 2, 1, 0, 0, 1, 0, 0, 0])
    assert _unlearned(_Target(y, y >= 0, True, 3), folds).tolist() == [False, False, True]
    hot = np.zeros((9, 3), np.float32)
    hot[:6, 0] = 1  # on every product but the last fold's
    hot[[0, 3], 1] = 1  # in two folds
    hot[[4, 5], 2] = 1  # in one fold
    assert _unlearned(_Target(hot, np.ones(9, bool), False, 3), folds).tolist() == [True, False, True]
    # a product unlabelled for the attribute counts for neither side
    known = np.ones(9, bool)
    known[[6, 7, 8]] = False
    assert _unlearned(_Target(hot, known, False, 3), folds).tolist() == [False, False, True]


def _fit_image(model: MultimodalModel, image: np.ndarray, y: np.ndarray, taxonomy: Taxonomy) -> Any:
    """The stack fitted on products alike but for their image vectors ``image``, labelled ``y``."""
    return _fit(
        model,
        _embeddings(model, ["item"] * N, image),
        EncodedLabels({"thing": y}, {"thing": y >= 0}),
        taxonomy,
    )


def test_standardisation_keeps_a_small_pure_colour_signal_separable() -> None:
    taxonomy = _taxonomy()
    model = _model(taxonomy)
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, N)
    image = rng.normal(scale=10.0, size=(N, model.fusion.image_dim)).astype(np.float32)
    colour = model.fusion.dims["colour"]
    # colour statistics a thousand times smaller than the CNN's noise; ten of them carry the label
    image[:, -colour:] = rng.normal(scale=1e-3, size=(N, colour))
    image[:, -colour : -colour + 10] = 1e-3 * y[:, None] + rng.normal(scale=1e-4, size=(N, 10))
    fit = _fit_image(model, image, y, taxonomy)
    # chance is 1/3; 317 noise statistics beside 240 training rows per fold cost a tenth of it
    assert attribute_average_precision(fit.oof.probs["thing"], y, "multiclass") > 0.8
    assert fit.mix["thing"]["colour"] > max(fit.mix["thing"][b] for b in ("ngrams", "text", "image"))


def test_the_close_up_is_a_block_of_its_own_that_learns_what_only_it_sees() -> None:
    taxonomy = _taxonomy()
    cfg = tiny_config(fusion="stack", model={"image": {"pooling": "stages", "close_up": True}})
    model = build_model(cfg.model, taxonomy, vocab_size=50)
    fusion = model.fusion
    assert isinstance(fusion, StackFusion) and fusion.blocks[-1] == "close_up"
    whole, close_up = fusion.dims["image"], fusion.dims["close_up"]
    assert whole == close_up and fusion.image_dim == whole + close_up + fusion.dims["colour"]
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, N)
    image = rng.normal(size=(N, fusion.image_dim)).astype(np.float32)
    # the label in a fifth of the close-up's features (the image vector's middle part) only
    image[:, whole : whole + close_up // 5] += y[:, None]
    fit = _fit_image(model, image, y, taxonomy)
    assert attribute_average_precision(fit.oof.probs["thing"], y, "multiclass") > 0.9
    others = ("ngrams", "text", "image", "colour")
    assert fit.mix["thing"]["close_up"] > max(fit.mix["thing"][b] for b in others)
    # served from the fitted parameters, the close-up's learner is the one that ranks
    inputs = FusionInputs(
        text_pooled=torch.zeros(N, fusion.text_dim),
        image_pooled=torch.from_numpy(image),
        image_present=torch.ones(N),
        lexical=as_bags(ngram_counts(["item"] * N, [None] * N)),
    )
    served = model.fuse(inputs).probs["thing"].numpy()
    assert attribute_average_precision(served, y, "multiclass") > 0.9


def test_each_value_leans_on_the_block_that_tells_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The meta-learner's per-value weights: block 0 tells value 0 and is noise on the others, block
    1 the reverse. Each value weighs the block that tells it more, and the blend is right about as
    often as the blocks' signals allow (separation 4 SDs: 99 %), where weights every value shares
    must take in each block's noise (about 60 %)."""
    import catalog_enrichment.training.stack as stack

    rng = np.random.default_rng(5)
    n = 3000
    y = rng.integers(0, 3, n)
    hot = np.eye(3)[y]
    z = rng.normal(scale=3.0, size=(2, n, 3))  # noise
    z[0, :, 0] = 2.0 * hot[:, 0] + rng.normal(scale=0.5, size=n)
    z[1, :, 1:] = 2.0 * hot[:, 1:] + rng.normal(scale=0.5, size=(n, 2))
    z = z.astype(np.float32)
    target, blocks = stack._Target(y, np.ones(n, bool), True, 3), ("ngrams", "text")
    present, fit, held = np.ones(n, np.float32), np.arange(n // 2), np.arange(n // 2, n)

    def right() -> tuple[np.ndarray, float]:
        meta = stack._fit_meta(z, present, target, fit, blocks)
        probs = stack._meta_probs(z[:, held], present[held], meta, "multiclass", blocks)
        return meta[0][:, None] + meta[1], float((probs.argmax(axis=1) == y[held]).mean())

    weights, hit = right()
    assert weights[0, 0] > max(weights[0, 1:]) and min(weights[1, 1:]) > weights[1, 0]
    assert hit > 0.97
    monkeypatch.setattr(stack, "_VALUE_L2", 1e6)  # no value's own part: the weights are shared
    assert right()[1] < 0.7


def test_weights_saved_before_the_per_value_meta_weights_load_as_the_shared_ones() -> None:
    model = _model(_taxonomy())
    state = model.state_dict()
    assert state["fusion.meta_weight"].shape == (len(model.fusion.blocks), len(WORDS))
    del state["fusion.meta_weight"]
    older = _model(_taxonomy())
    older.fusion.meta_weight.fill_(1.0)
    older.load_state_dict(state)  # strict
    assert not older.fusion.meta_weight.any()


def test_a_single_valued_multilabel_attribute_is_one_distribution_with_one_value_per_product() -> None:
    taxonomy = _taxonomy("multilabel")
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, N)
    titles = [f"{WORDS[v] if rng.random() < 0.7 else 'plain'} item" for v in y]
    model = _model(taxonomy)
    emb = _embeddings(model, titles)
    hot = np.eye(3, dtype=np.float32)[y]
    fit = _fit(model, emb, EncodedLabels({"thing": hot}, {"thing": np.ones(N, bool)}), taxonomy)
    assert bool(model.fusion.single[0])
    with torch.no_grad():
        served = model.fuse(emb.inputs(torch.arange(N))).probs["thing"].numpy()
    single = taxonomy.with_single_valued(["thing"])  # what training saves the model with
    for probs in (fit.oof.probs["thing"], served):
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)  # one distribution
        kept = single.derive({"thing": probs})["thing"]
        assert ((kept > 0).sum(axis=1) == 1).all()  # the first-ranked value only: one can be written
    # two colours on one product: one-vs-rest, several may be written
    hot[:40, (y[:40] + 1) % 3] = 1
    other = _model(taxonomy)
    _fit(other, emb, EncodedLabels({"thing": hot}, {"thing": np.ones(N, bool)}), taxonomy)
    assert not bool(other.fusion.single[0])


def test_the_served_model_scores_like_the_fold_models_that_calibrate_it() -> None:
    taxonomy = _taxonomy()
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, N)
    titles = [
        f"{WORDS[v] if rng.random() < 0.6 else WORDS[(v + 1) % 3]} thing {i % 7}" for i, v in enumerate(y)
    ]
    model = _model(taxonomy)
    emb = _embeddings(model, titles)
    fit = _fit(model, emb, EncodedLabels({"thing": y}, {"thing": y >= 0}), taxonomy)
    with torch.no_grad():
        served = model.fuse(emb.inputs(torch.arange(N))).probs["thing"].numpy()
    # the mean of the fold models is as confident as each fold model, on the same products
    top_served, top_oof = served.max(axis=1), fit.oof.probs["thing"].max(axis=1)
    assert abs(float(np.median(top_served)) - float(np.median(top_oof))) < 0.05
    # and a saved model scores the same after loading (the vocabulary's size comes with it)
    again = _model(taxonomy)
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        reloaded = again.fuse(emb.inputs(torch.arange(N))).probs["thing"].numpy()
    np.testing.assert_array_equal(reloaded, served)


def _separable_folds() -> tuple[np.ndarray, Any, list[tuple[np.ndarray, np.ndarray]]]:
    """Three values each named by a word of the title (separable n-gram rows), in three folds."""
    from catalog_enrichment.training.splits import group_folds

    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, N)
    titles = [f"{WORDS[v]} {rng.choice(['nice', 'new', 'warm'])} {i % 11}" for i, v in enumerate(y)]
    counts = ngram_counts(titles, [None] * N)
    x = tfidf(counts, *document_frequency(counts))
    return y, x, group_folds(np.eye(3, dtype=np.int8)[y], np.arange(N), 3, 0)


def test_a_folds_out_of_fold_scores_do_not_depend_on_its_own_labels() -> None:
    """Relabel the products of one cross-fit fold: the scores that fold's learner gives them stay
    the same to the bit (each fold is fitted from zero on the other folds' rows). A fold fitted from
    the first fold's learner, which trained on these products, moved with their labels wherever
    L-BFGS stopped short of the optimum - as it does here, almost unpenalised on separable rows."""
    from catalog_enrichment.training.stack import _fit_path, _Target

    y, x, folds = _separable_folds()
    _, out = folds[1]
    relabelled = y.copy()
    relabelled[out] = (y[out] + 1) % 3
    scores = [
        _fit_path(x, _Target(labels, labels >= 0, True, 3), folds, [1e4])[2][out]
        for labels in (y, relabelled)
    ]
    np.testing.assert_array_equal(scores[0], scores[1])


def test_no_fold_s_rows_choose_the_penalty_of_the_learner_that_scores_them() -> None:
    """The first fold's rows choose the penalty of the other folds' learners: two of them
    relabelled turn that choice from 0.01 to 10,000, while the first fold's own learner, whose
    penalty the second fold's rows chose, gives them the same scores to the bit. (Chosen on the
    first fold's rows as well, it moved with them.)"""
    from catalog_enrichment.training.stack import _fit_path, _Target

    y, x, folds = _separable_folds()
    _, out = folds[0]
    relabelled = y.copy()
    relabelled[out[:2]] = (y[out[:2]] + 1) % 3
    fitted = [
        _fit_path(x, _Target(labels, labels >= 0, True, 3), folds, (0.01, 1e4)) for labels in (y, relabelled)
    ]
    assert (fitted[0][0][0], fitted[1][0][0]) == (0.01, 1e4)
    np.testing.assert_array_equal(fitted[0][2][out], fitted[1][2][out])


def test_the_stack_needs_the_lexical_inputs() -> None:
    from catalog_enrichment.errors import ConfigError

    model = _model(_taxonomy())
    inputs = FusionInputs(
        image_present=torch.ones(2),
        text_pooled=torch.zeros(2, 32),
        image_pooled=torch.zeros(2, model.fusion.image_dim),
    )
    with pytest.raises(ConfigError, match="n-grams"):
        model.fuse(inputs)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_a_trained_stack_is_served_by_the_predictor_as_it_was_tested(
    tmp_path: Path, taxonomy: Taxonomy, streamed: bool
) -> None:
    """End to end over tiny pretrained encoders, the table in memory or streamed in record batches
    (embedded a batch at a time, never read whole): training fits the stack in closed form; the saved
    bundle, loaded and scored by the predictor (texts counted into n-grams, images pooled by stage,
    in memory with a close-up), gives the test scores training reported - through the embedding
    store too."""
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.config import SyntheticConfig
    from catalog_enrichment.data.synthetic import generate_marketplace
    from catalog_enrichment.embeddings import vectors as embedding
    from catalog_enrichment.inference.bundle import load_bundle
    from catalog_enrichment.inference.predictor import BatchPredictor, PredictorOptions
    from catalog_enrichment.training.pipeline import train
    from catalog_enrichment.training.stream import Source
    from tests.conftest import save_trained
    from tests.models.test_pretrained import VOCAB, _cfg, _save_image_weights, _save_text_model

    paths = {
        "text": _save_text_model(tmp_path / "text", VOCAB),
        "image": _save_image_weights(tmp_path / "i.pth"),
    }
    market = generate_marketplace(
        tmp_path / "m", SyntheticConfig(products=400, seed=5, image_size=32, bad_rate=0.0), taxonomy=taxonomy
    )
    table = read_table(market.products)
    streaming = {"enabled": streamed, "batch_rows": 64}
    cache = str(tmp_path / "cache")
    cfg = _cfg(paths, encoders="frozen", embedding_cache=cache, crossfit_folds=3, streaming=streaming)
    model_cfg = cfg.model.model_copy(
        update={
            "fusion": "stack",
            "image": cfg.model.image.model_copy(update={"pooling": "stages", "close_up": not streamed}),
        }
    )
    cfg = cfg.model_copy(update={"model": model_cfg})
    passes = 0

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal passes
        passes += 1
        return iter(table.to_batches(max_chunksize=64))

    trained = train(Source(batches, table.num_rows, tuple(table.column_names)), taxonomy, cfg)
    # in memory the table is read once; streamed, a survey pass and an embedding pass, and the
    # held-out splits are scored from the vectors
    assert passes == (2 if streamed else 1)
    assert trained.heldout_fit["penalties"].keys() == {a.name for a in taxonomy}
    # no validation split: every product but the test split trains, and calibrates out of fold
    assert trained.splits.validation.size == 0 and trained.heldout.family is None
    assert trained.splits.train.size + trained.splits.test.size == table.num_rows
    position = {pid: i for i, pid in enumerate(table["product_id"].to_pylist())}
    # the out-of-fold calibration knows each training product's group: products that share a title
    # are variants of one, and count as one trial in the bound
    groups = trained.heldout.calibration_groups
    assert groups is not None and groups.shape == (trained.splits.train.size,)
    titles = table["title"].to_pylist()
    of_title: dict[str, set[int]] = {}
    for i, g in zip(trained.splits.train, groups, strict=True):
        of_title.setdefault(titles[position[trained.product_ids[i]]], set()).add(int(g))
    assert all(len(g) == 1 for g in of_title.values()) and len(of_title) < trained.splits.train.size
    test_rows = table.take([position[trained.product_ids[i]] for i in trained.splits.test])
    saved = save_trained(trained, tmp_path / "bundle")
    bundle = load_bundle(saved)
    served = BatchPredictor(bundle, PredictorOptions(batch_size=64)).score(test_rows)
    assert bundle.taxonomy.to_dict() == trained.taxonomy.to_dict()  # single-valued marks included
    expected = trained.taxonomy.derive(trained.test_predictions.probs)
    # the predictor encodes in batches of its own: a product's vectors differ from training's by
    # float32 rounding (within 3e-6 in memory, 6e-6 streamed, where each record batch is embedded
    # on its own), which the stack fitted on the streamed split scales up to 1.3e-5 on one score
    tolerance = 1e-4 if streamed else 1e-5
    for attr in taxonomy.outputs:
        np.testing.assert_allclose(served[attr.name], expected[attr.name], atol=tolerance)
    # through the store: every row's vector read back, the n-grams counted again from the texts
    store = BatchPredictor(bundle, PredictorOptions(batch_size=64, embedding_store=True))
    first = store.score_arrow(test_rows)
    assert first.embedding is not None and all(v is not None for v in first.embedding)
    stored = test_rows.append_column("stored_content", pa.array(first.content)).append_column(
        "stored_embedding", pa.array(first.embedding, pa.binary())
    )
    again = store.score_arrow(stored)
    assert again.reused == test_rows.num_rows
    for attr in taxonomy.outputs:
        np.testing.assert_allclose(again.probs[attr.name], served[attr.name], atol=1e-5)
    assert embedding.storable(bundle.model)
    assert bundle.preprocessing.close_up == (not streamed) and bundle.model.fusion.blocks[-1] == (
        "colour" if streamed else "close_up"
    )
    _served_ngrams_follow_the_bundles_mark(saved, test_rows, served)


def _served_ngrams_follow_the_bundles_mark(
    saved: Path, rows: pa.Table, served: dict[str, np.ndarray]
) -> None:
    """A bundle trained here (its n-grams counted on NFKC-normalised texts, in memory or streamed)
    counts a full-width title's n-grams as its ASCII twin's; one whose weights were saved without
    the mark counts them as typed, and serves ASCII texts as before."""
    import shutil

    from catalog_enrichment.inference.bundle import load_bundle
    from catalog_enrichment.inference.predictor import BatchPredictor, PredictorOptions
    from catalog_enrichment.models.model import LEXICAL_KEYS

    wide = rows
    for column in ("title", "description"):
        texts = [_full_width(t) if isinstance(t, str) else t for t in rows[column].to_pylist()]
        wide = wide.set_column(wide.column_names.index(column), column, pa.array(texts, pa.string()))
    assert wide["title"].to_pylist() != rows["title"].to_pylist()

    def ngrams(bundle_path: Path, table: pa.Table) -> list[torch.Tensor]:
        predictor = BatchPredictor(load_bundle(bundle_path), PredictorOptions(batch_size=1 << 12))
        (batch,) = predictor.prepared(table)
        return [batch.inputs[k] for k in LEXICAL_KEYS]

    def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))

    assert equal(ngrams(saved, wide), ngrams(saved, rows))
    older = saved.parent / "older"
    shutil.copytree(saved, older)
    weights = torch.load(older / "weights.pt", weights_only=True)
    del weights["fusion.lex_nfkc"]
    torch.save(weights, older / "weights.pt")
    assert not equal(ngrams(older, wide), ngrams(older, rows))
    again = BatchPredictor(load_bundle(older), PredictorOptions(batch_size=64)).score(rows)
    for name, scores in served.items():
        np.testing.assert_array_equal(again[name], scores)


def _held(megabytes: int) -> int:
    """A worker task that keeps ``megabytes`` of memory for the rest of its process's life (as a
    worker that read other memory-mapped blocks does); returns the worker's pid."""
    import builtins
    import os

    builtins.__dict__.setdefault("_held_by_test", []).append(np.ones(megabytes << 17))
    time.sleep(1.1)  # loky checks a worker's memory at most once a second
    return os.getpid()


@pytest.mark.timeout(120)
def test_loky_replacing_a_grown_worker_loses_no_fit_and_its_warning_stays_out_of_the_log() -> None:
    import warnings

    from joblib import Parallel, delayed

    from catalog_enrichment.training.stack import _quiet_worker_restarts

    def run() -> tuple[list[int], list[str]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _quiet_worker_restarts():
                pids = list(Parallel(n_jobs=2, return_as="generator")(delayed(_held)(400) for _ in range(6)))
                warnings.warn("another warning", UserWarning, stacklevel=1)
        return pids, [str(w.message) for w in caught]

    try:
        pids, said = run()
    finally:  # the workers, each holding 400 MB or more, stopped now, not at loky's idle timeout
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
    # each worker grew by 400 MB after its first task: loky replaced it (more than two pids), every
    # task's result came back, and only its own warning was kept out
    assert len(pids) == 6 and len(set(pids)) > 2
    assert said == ["another warning"]
