"""Fitting the ``stack`` fusion (``models.fusion.StackFusion``) over cached encoder outputs.

Every block is a linear learner fitted to convergence (scikit-learn's L-BFGS logistic regression;
one-vs-rest for a multi-label attribute, one softmax for a multi-class or single-valued one) on each
block's standardised features, one per cross-fit fold. Per block and attribute the L2 penalty is
the one of :data:`PENALTIES` whose out-of-fold log-loss is lowest. A meta-learner per attribute
(one weight per block, a bias per value) is fitted on the blocks' out-of-fold scores.

What serves is the mean of the fold models (the mean of linear learners over one feature space is
a linear learner: their weights averaged), under the meta-learner fitted on every out-of-fold
score. What calibrates is the out-of-fold scores of the same construction: for each fold, that
fold's learners under a meta-learner fitted on the other folds' out-of-fold scores - so the
thresholds are computed on scores of the predictor that serves, not on a differently trained one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from joblib import Parallel, delayed

from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import EncodedLabels
from catalog_enrichment.models.fusion import STACK_BLOCKS, StackFusion, stack_scores
from catalog_enrichment.models.lexical import document_frequency, tfidf
from catalog_enrichment.models.model import MultimodalModel
from catalog_enrichment.training.embeddings import Embeddings
from catalog_enrichment.training.evaluation import Predictions
from catalog_enrichment.training.splits import group_folds
from catalog_enrichment.types import Say

__all__ = ["PENALTIES", "StackFit", "fit_stack", "single_valued"]

# inverse L2 strengths (scikit-learn's C) tried per block and attribute
PENALTIES = (0.001, 0.01, 0.1, 1.0, 10.0)
_META_L2 = 1e-3
_ABSENT = -20.0  # the logit of a value no product of a fold's training rows has
_MAX_ITER, _TOL = 200, 1e-3
_JOBS = 2  # blocks fitted side by side (scikit-learn's L-BFGS over sparse rows runs on one core)


@dataclass
class StackFit:
    """The fitted stack: the model that serves, its out-of-fold scores over the training rows, and
    per attribute and block the penalty chosen and the meta-learner's block weights."""

    model: MultimodalModel
    oof: Predictions
    penalties: dict[str, dict[str, float]]
    mix: dict[str, dict[str, float]]


def single_valued(labels: EncodedLabels, attr: str) -> bool:
    """Whether a multi-label attribute is single-valued: every labelled product has one value."""
    t = labels.targets[attr]
    if t.ndim != 2:
        return False
    known = labels.known[attr]
    return bool(known.any()) and bool((t[known].sum(axis=1) == 1).all())


@dataclass
class _Target:
    """One attribute's training target: class indices (softmax) or a multi-hot matrix (one-vs-rest)."""

    y: np.ndarray
    known: np.ndarray
    softmax: bool
    n_values: int


def _target(labels: EncodedLabels, attr: str, n_values: int) -> _Target:
    t = labels.targets[attr]
    if t.ndim == 1:
        return _Target(t, t >= 0, True, n_values)
    if single_valued(labels, attr):
        return _Target(np.where(labels.known[attr], t.argmax(axis=1), -1), labels.known[attr], True, n_values)
    return _Target(t, labels.known[attr], False, n_values)


def _fit_linear(
    x: Any, target: _Target, rows: np.ndarray, c: float, start: Any = None
) -> tuple[np.ndarray, np.ndarray, Any]:
    """``(weight (d, V), bias (V,), state)`` of logistic regression fitted on ``rows`` of ``x``;
    ``state`` warm-starts the next fit on the same rows (a path over ascending ``c``)."""
    from sklearn.linear_model import LogisticRegression

    rows = rows[target.known[rows]]
    d, v = x.shape[1], target.n_values
    weight, bias = np.zeros((d, v), np.float32), np.full(v, _ABSENT, np.float32)
    states = dict(start or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs's ConvergenceWarning at max_iter
        if target.softmax:
            y = target.y[rows]
            classes = np.unique(y)
            if classes.size == 1:
                bias[classes[0]] = 0.0
                return weight, bias, states
            model = states.get(-1) or LogisticRegression(max_iter=_MAX_ITER, tol=_TOL, warm_start=True)
            model.set_params(C=c).fit(x[rows], y)
            states[-1] = model
            coef, intercept = model.coef_, model.intercept_
            if classes.size == 2:  # sklearn's binary case: one row for the second class
                coef = np.stack([-coef[0] / 2, coef[0] / 2])
                intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
            weight[:, classes], bias[classes] = coef.T, intercept
            return weight, bias, states
        for value in range(v):
            y = target.y[rows, value] > 0.5
            if not y.any() or y.all():
                bias[value] = _ABSENT if not y.any() else -_ABSENT
                continue
            model = states.get(value) or LogisticRegression(max_iter=_MAX_ITER, tol=_TOL, warm_start=True)
            model.set_params(C=c).fit(x[rows], y)
            states[value] = model
            weight[:, value], bias[value] = model.coef_[0], model.intercept_[0]
    return weight, bias, states


def _fit_block(
    x: Any, target: _Target, folds: list[tuple[np.ndarray, np.ndarray]], penalties: Sequence[float]
) -> tuple[float, float, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """One block's learners for one attribute: ``(C, out-of-fold log-loss, normalised out-of-fold
    scores, each fold's (weight, bias))``. The penalty is chosen on the first fold's held-out
    log-loss along a warm-started path; the other folds are fitted at that penalty."""
    n = x.shape[0]
    scores = np.zeros((n, target.n_values), np.float32)
    fit_pos, out_pos = folds[0]
    best: tuple[float, float, tuple[np.ndarray, np.ndarray]] | None = None
    state = None
    for c in sorted(penalties):
        w, b, state = _fit_linear(x, target, fit_pos, c, state)
        loss = _log_loss(
            _normalised(x[out_pos] @ w + b, target.softmax), target, np.arange(out_pos.size), out_pos
        )
        if best is None or loss < best[0]:
            best = (loss, c, (w, b))
    assert best is not None
    c = best[1]
    fits = [best[2]]
    for fit_pos, _ in folds[1:]:
        w, b, _ = _fit_linear(x, target, fit_pos, c)
        fits.append((w, b))
    for (w, b), (_, out_pos) in zip(fits, folds, strict=True):
        scores[out_pos] = x[out_pos] @ w + b
    normalised = _normalised(scores, target.softmax)
    return c, _log_loss(normalised, target, np.arange(n)), normalised, fits


def _normalised(scores: np.ndarray, softmax: bool) -> np.ndarray:
    t = torch.from_numpy(scores)
    return (torch.log_softmax(t, dim=-1) if softmax else t).numpy()


def _log_loss(
    z: np.ndarray, target: _Target, rows: np.ndarray, label_rows: np.ndarray | None = None
) -> float:
    """Mean log-loss of normalised scores ``z`` over its labelled ``rows`` (whose labels are the
    target's ``label_rows``, the same rows unless given)."""
    label_rows = rows if label_rows is None else label_rows
    known = target.known[label_rows]
    rows, label_rows = rows[known], label_rows[known]
    if target.softmax:
        return float(-z[rows, target.y[label_rows]].mean())
    y = target.y[label_rows]
    logp = -np.logaddexp(0, -z[rows])
    lognp = -np.logaddexp(0, z[rows])
    return float(-(y * logp + (1 - y) * lognp).mean())


def _fit_meta(
    z: np.ndarray, present: np.ndarray, target: _Target, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(mix (blocks,), bias (V,))``: the meta-learner over ``z`` ``(blocks, n, V)`` on ``rows``."""
    rows = rows[target.known[rows]]
    zt = torch.from_numpy(z[:, rows]).double()
    gate = torch.from_numpy(present[rows])
    mix = torch.full((z.shape[0],), 1.0 / z.shape[0], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(z.shape[2], dtype=torch.float64, requires_grad=True)
    kind = "multiclass" if target.softmax else "multilabel"
    y = torch.from_numpy(target.y[rows])
    optimizer = torch.optim.LBFGS([mix, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits, _ = stack_scores(list(zt), gate, mix, bias, kind, single=False)
        if target.softmax:
            loss = torch.nn.functional.cross_entropy(logits, y)
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.double())
        loss = loss + _META_L2 * (mix.square().sum() + bias.square().mean())
        loss.backward()
        return loss

    optimizer.step(closure)
    return mix.detach().float().numpy(), bias.detach().float().numpy()


def _meta_probs(
    z: np.ndarray, present: np.ndarray, mix: np.ndarray, bias: np.ndarray, kind: str, single: bool
) -> np.ndarray:
    _, p = stack_scores(
        list(torch.from_numpy(z)), torch.from_numpy(present), torch.from_numpy(mix), torch.from_numpy(bias),
        kind, single,
    )  # fmt: skip
    return p.numpy()


def _standardise(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x[rows].mean(axis=0) if rows.size else np.zeros(x.shape[1], np.float32)
    scale = x[rows].std(axis=0) if rows.size else np.ones(x.shape[1], np.float32)
    return mean.astype(np.float32), np.where(scale > 1e-6, scale, 1.0).astype(np.float32)


def fit_stack(
    model: MultimodalModel,
    embeddings: Embeddings,
    labels: EncodedLabels,
    train: np.ndarray,
    groups: np.ndarray,
    taxonomy: Taxonomy,
    *,
    folds: int,
    seed: int,
    say: Say,
    penalties: Sequence[float] = PENALTIES,
) -> StackFit:
    """Fit ``model``'s stack fusion (in place) on the ``train`` rows of the embedded products.

    ``folds`` cross-fit folds of whole ``groups``, stratified over every attribute value; the
    returned out-of-fold scores are in ``train`` order.
    """
    fusion = model.fusion
    assert isinstance(fusion, StackFusion)
    tensors = embeddings.tensors
    present = tensors["image_present"].float().numpy()
    image = tensors["image_pooled"].float().numpy()
    split = fusion.dims["image"]
    # vocabulary, IDF and standardisation come from every training row: no label is read
    vocabulary, idf = document_frequency(embeddings.lexical[train])
    with_image = train[present[train] > 0]
    blocks: dict[str, Any] = {"ngrams": tfidf(embeddings.lexical, vocabulary, idf)}
    scaling: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for block, x, rows in (
        ("text", tensors["text_pooled"].float().numpy(), train),
        ("image", image[:, :split], with_image),
        ("colour", image[:, split:], with_image),
    ):
        scaling[block] = _standardise(x, rows)
        blocks[block] = (x - scaling[block][0]) / scaling[block][1]
    widths = ", ".join(f"{b} {blocks[b].shape[1]:,}" for b in STACK_BLOCKS)
    say(f"stack: {vocabulary.size:,} n-grams; blocks {widths}")
    fold_rows = group_folds(labels.subset(train).stratification_matrix(), groups[train], folds, seed)
    n, total = len(train), int(fusion.offsets[-1])
    served = {
        b: (np.zeros((blocks[b].shape[1], total), np.float32), np.zeros(total, np.float32))
        for b in STACK_BLOCKS
    }
    oof_probs: dict[str, np.ndarray] = {}
    chosen: dict[str, dict[str, float]] = {}
    mixes: dict[str, dict[str, float]] = {}
    for k, attr in enumerate(taxonomy):
        lo, hi = fusion.offsets[k], fusion.offsets[k + 1]
        target = _target(labels.subset(train), attr.name, hi - lo)
        fusion.single[k] = attr.kind == "multilabel" and target.softmax
        z = np.zeros((len(STACK_BLOCKS), n, hi - lo), np.float32)
        chosen[attr.name] = {}
        fitted = Parallel(n_jobs=min(_JOBS, len(STACK_BLOCKS)))(
            delayed(_fit_block)(blocks[block][train], target, fold_rows, penalties) for block in STACK_BLOCKS
        )
        for b, (block, (c, loss, scores, fits)) in enumerate(zip(STACK_BLOCKS, fitted, strict=True)):
            z[b] = scores
            chosen[attr.name][block] = c
            weight, bias = served[block]
            weight[:, lo:hi] = np.mean([w for w, _ in fits], axis=0)
            bias[lo:hi] = np.mean([bb for _, bb in fits], axis=0)
            say(f"stack: {attr.name} / {block}: C {c:g}, out-of-fold log-loss {loss:.3f}")
        kind = "multiclass" if target.softmax else "multilabel"
        single = bool(fusion.single[k])
        gate = present[train]
        probs = np.zeros((n, hi - lo), np.float32)
        for fit_pos, out_pos in fold_rows:  # the meta-learner cross-fitted: honest out-of-fold scores
            mix, bias = _fit_meta(z, gate, target, fit_pos)
            probs[out_pos] = _meta_probs(z[:, out_pos], gate[out_pos], mix, bias, kind, single)
        oof_probs[attr.name] = probs
        mix, bias = _fit_meta(z, gate, target, np.arange(n))
        with torch.no_grad():
            fusion.mix[k] = torch.from_numpy(mix)
            fusion.meta_bias[lo:hi] = torch.from_numpy(bias)
        mixes[attr.name] = {block: round(float(m), 4) for block, m in zip(STACK_BLOCKS, mix, strict=True)}
    _install(fusion, vocabulary, idf, scaling, served)
    return StackFit(model, Predictions(oof_probs, None, {}), chosen, mixes)


def _install(
    fusion: StackFusion,
    vocabulary: np.ndarray,
    idf: np.ndarray,
    scaling: dict[str, tuple[np.ndarray, np.ndarray]],
    served: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    """The fitted numbers into the fusion's parameters and buffers."""
    param: Callable[[np.ndarray], torch.nn.Parameter] = lambda a: torch.nn.Parameter(  # noqa: E731
        torch.from_numpy(np.ascontiguousarray(a, np.float32)), requires_grad=False
    )
    with torch.no_grad():
        fusion.lex_rows.fill_(-1)
        fusion.lex_rows[torch.from_numpy(vocabulary)] = torch.arange(vocabulary.size)
        fusion.lex_idf = torch.from_numpy(idf)
        fusion.lex_weight, fusion.lex_bias = param(served["ngrams"][0]), param(served["ngrams"][1])
        for block in ("text", "image", "colour"):
            mean, scale = scaling[block]
            setattr(fusion, f"{block}_mean", torch.from_numpy(mean))
            setattr(fusion, f"{block}_scale", torch.from_numpy(scale))
            setattr(fusion, f"{block}_weight", param(served[block][0]))
            setattr(fusion, f"{block}_bias", param(served[block][1]))
