"""Fitting the ``stack`` fusion (``models.fusion.StackFusion``) over cached encoder outputs.

Every block is a linear learner fitted to convergence by full-batch L-BFGS (torch): one softmax for
a multi-class or single-valued attribute, independent sigmoids (one-vs-rest) for a multi-label one,
with an L2 penalty, on each cross-fit fold. Blocks are put on one scale first - the n-gram rows are
L2-normalised TF-IDF, each dense block is standardised with its training statistics and divided by
the square root of its width - so one penalty grid (:data:`PENALTIES`, scikit-learn's ``C``) serves
every block. Per block and attribute the penalty is the one of the grid whose held-out average
precision on the first fold is highest (along a warm-started path); the other folds are fitted at
it - the second along its own warm-started path, the rest from zero - and the first fold at the one
the second fold's rows choose: no fold's rows fit its learner or choose its penalty (they help fit
the learners other folds' rows choose among), and every path starts from its own rows' fits.
Average precision ranks the confident predictions that R@P95 lives on; log-loss prefers the blunter
models. A meta-learner per attribute (per block a weight shared by the values and each value's own
part of it, held near 0 by a penalty; a bias per value) is fitted on the blocks' out-of-fold scores.

A value whose training products all sit in one fold is learned by every fold model but the one
that scores them out of fold (multi-label, the same for one whose products without it do): the
calibration set shows nothing of how the served model, which learned it, scores it. Such a value
is named (:attr:`StackFit.unlearned`) for the calibration to keep out.

What serves is the mean of the fold models (the mean of linear learners over one feature space is
a linear learner: their weights averaged), under the meta-learner fitted on every out-of-fold
score. What calibrates is the out-of-fold scores of the same construction: for each fold, that
fold's learners under a meta-learner fitted on the other folds' out-of-fold scores - so the
thresholds are computed on scores of the predictor that serves, not on a differently trained one.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from joblib import Parallel, delayed

from catalog_enrichment.contracts import AttributeKind, Taxonomy
from catalog_enrichment.data.dataset import EncodedLabels
from catalog_enrichment.embeddings.frozen import Embeddings
from catalog_enrichment.metrics import attribute_average_precision
from catalog_enrichment.models.fusion import StackFusion, stack_scores
from catalog_enrichment.models.lexical import document_frequency, tfidf
from catalog_enrichment.models.model import MultimodalModel
from catalog_enrichment.training.evaluation import Predictions
from catalog_enrichment.types import Say

if TYPE_CHECKING:  # not imported at run time: the fit's worker processes import this module
    from catalog_enrichment.training.fit import FitResult
    from catalog_enrichment.training.splits import FoldPlan

__all__ = ["PENALTIES", "STACK_FOLDS", "UNLEARNED", "StackFit", "fit_stack", "single_valued", "stacked"]

# the stack's cross-fit folds unless training.crossfit_folds sets them: each fold model trains on
# 80 % of the training split, close to the mean of them all that serves
STACK_FOLDS = 5

# inverse L2 strengths (scikit-learn's C) tried per block and attribute, on blocks of unit row norm
PENALTIES = (1.0, 4.0, 16.0, 64.0)
_META_L2 = 1e-3
# the penalty on a value's own part of its block weights (the meta-learner's per-value freedom)
_VALUE_L2 = 1e-2
_ABSENT = -20.0  # the logit of a value no product of a fold's training rows has
_MAX_ITER, _TOL = 200, 1e-4  # L-BFGS's iterations and gradient tolerance (scikit-learn's defaults)
_JOBS = 2  # (attribute, block) fits side by side, one core each
# the calibration reason of a value StackFit.unlearned names
UNLEARNED = (
    "scored out of fold by a fold model that could not learn it (one cross-fit fold held every "
    "training product with it, or without it)"
)
# what joblib's loky warns when it replaces a worker (see _quiet_worker_restarts)
_WORKER_RESTART = "A worker stopped while some jobs were given to the executor"


@dataclass
class StackFit:
    """The fitted stack: the model that serves, its out-of-fold scores over the training rows, per
    attribute and block the penalties chosen (the other folds', the first fold's) and the
    meta-learner's block weights, and per attribute the values the out-of-fold scores cannot
    calibrate (:func:`_unlearned`; attributes with none left out)."""

    model: MultimodalModel
    oof: Predictions
    penalties: dict[str, dict[str, tuple[float, float]]]
    mix: dict[str, dict[str, float]]
    unlearned: dict[str, tuple[str, ...]]


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
    """The attribute's target; for one distribution (softmax), a product without a label whose one
    value people confirmed has that value (:func:`confirmed_values`)."""
    t = labels.targets[attr]
    if t.ndim == 1:
        y = np.where(t >= 0, t, confirmed_values(labels, attr))
        return _Target(y, y >= 0, True, n_values)
    if single_valued(labels, attr):
        y = np.where(labels.known[attr], t.argmax(axis=1), confirmed_values(labels, attr))
        return _Target(y, y >= 0, True, n_values)
    return _Target(t, labels.known[attr], False, n_values)


def confirmed_values(labels: EncodedLabels, attr: str) -> np.ndarray:
    """``(n,)`` the value index people confirmed for each product (-1: none, or more than one). A
    one-vs-rest attribute (several values a product) does not learn from verdicts in the stack, nor
    does any attribute from a rejection: the stack's learners fit whole labels."""
    partial = labels.partial.get(attr)
    if partial is None:
        return np.full(len(labels.known[attr]), -1, np.int64)
    one = (partial == 1).sum(axis=1) == 1
    return np.where(one, (partial == 1).argmax(axis=1), -1).astype(np.int64)


class _SparseProduct(torch.autograd.Function):
    """``x @ weight`` for a SciPy sparse ``x`` held in CSC, differentiable in ``weight``: both products
    in SciPy (``x`` in CSC and its transpose, a CSR view of it), several times faster than torch's
    sparse kernels or SciPy's CSR one on many more features than rows."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, x: Any) -> torch.Tensor:
        ctx.x = x
        return torch.from_numpy(np.asarray(x @ weight.detach().numpy(), np.float32))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.from_numpy(np.asarray(ctx.x.T @ grad.numpy(), np.float32)), None


def _linear_map(x: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``weight -> x @ weight`` for a dense (NumPy) or sparse (SciPy) block."""
    if hasattr(x, "tocsc"):
        csc = x.tocsc().astype(np.float32)
        return lambda weight: _SparseProduct.apply(weight, csc)
    dense = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    return lambda weight: dense @ weight


def _fit_linear(
    x: Any, target: _Target, rows: np.ndarray, c: float, start: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(weight (d, V), bias (V,))`` of the L2-penalised logistic regression fitted on ``rows`` of
    ``x`` (scikit-learn's objective: ``C`` times the summed log-loss plus half the squared weights),
    by full-batch L-BFGS from ``start`` (a warm start: the fit at the previous penalty of a path). A
    value the rows never have (or, multi-label, always have) gets no weights and a bias of
    -/+ :data:`_ABSENT`."""
    rows = rows[target.known[rows]]
    d, v = x.shape[1], target.n_values
    product = _linear_map(x[rows])
    if target.softmax:
        y = torch.from_numpy(target.y[rows].astype(np.int64))
        live = torch.zeros(v, dtype=torch.bool)
        live[y.unique()] = True
        fixed = torch.full((v,), _ABSENT)
    else:
        y = torch.from_numpy(target.y[rows].astype(np.float32))
        share = y.mean(dim=0)
        live = (share > 0) & (share < 1)
        fixed = torch.where(share > 0, -_ABSENT, _ABSENT)
    weight = torch.zeros(d, v) if start is None else torch.from_numpy(start[0].copy())
    bias = torch.zeros(v) if start is None else torch.from_numpy(start[1].copy())
    if (target.softmax and int(live.sum()) > 1) or (not target.softmax and bool(live.any())):
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        penalty = 0.5 / (c * rows.size)  # per row, as the loss is a mean over rows
        optimizer = torch.optim.LBFGS(
            [weight, bias], max_iter=_MAX_ITER, history_size=20, line_search_fn="strong_wolfe",
            tolerance_grad=_TOL, tolerance_change=1e-9,
        )  # fmt: skip

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = product(weight) + bias
            if target.softmax:
                loss = torch.nn.functional.cross_entropy(logits.masked_fill(~live, -1e4), y)
            else:
                per = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
                loss = (per * live).sum(dim=1).mean()
            loss = loss + penalty * (weight * live).square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    w, b = weight.detach().numpy().copy(), bias.detach().numpy().copy()
    w[:, ~live.numpy()] = 0.0
    b[~live.numpy()] = fixed[~live].numpy()
    return w, b


@contextmanager
def _quiet_worker_restarts() -> Iterator[None]:
    """Within: loky's warning that it replaced a worker, not passed on to the job's log. loky starts
    a new worker in place of one whose resident memory grew by 300 MB since its first task and warns
    "A worker stopped while some jobs were given to the executor ... or by a memory leak"; a fit's
    worker grows that much by reading other blocks (memory-mapped by joblib) and keeping freed torch
    buffers, not by a leak, and the worker sends its result before it stops: no fit is lost."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_WORKER_RESTART, category=UserWarning)
        yield


def _fit_block(
    x: Any, target: _Target, folds: list[tuple[np.ndarray, np.ndarray]], penalties: Sequence[float]
) -> tuple[tuple[float, float], float, np.ndarray, list[tuple[np.ndarray, np.ndarray]], float]:
    """One block's learners for one attribute: ``((C, the first fold's C), out-of-fold average
    precision, normalised out-of-fold scores, each fold's (weight, bias), seconds)``. The penalty
    is chosen on the first fold's held-out average precision along a warm-started path, and the
    other folds are fitted at it; the first fold's own is chosen the same way on the second fold's
    rows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core of its own beside the other fits' (see _JOBS)
    started = time.perf_counter()
    try:
        return (*_fit_path(x, target, folds, penalties), time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def _cost(x: Any, target: _Target) -> float:
    """About how long a block's fit takes: nonzero features per row times values."""
    per_row = x.nnz / max(x.shape[0], 1) if hasattr(x, "nnz") else x.shape[1]
    return float(per_row * target.n_values)


def _path(
    x: Any, target: _Target, fold: tuple[np.ndarray, np.ndarray], penalties: Sequence[float]
) -> tuple[float, dict[float, tuple[np.ndarray, np.ndarray]]]:
    """Along the penalties (warm-started, on ``fold``'s rows to fit on): the one whose fit ranks the
    fold's own rows best by average precision (the smallest of equals), and every fit by penalty."""
    fit_pos, out_pos = fold
    fits, held = {}, {}
    state = None
    for c in sorted(penalties):
        fits[c] = state = _fit_linear(x, target, fit_pos, c, state)
        z = _normalised(x[out_pos] @ state[0] + state[1], target.softmax)
        held[c] = _average_precision(z, target, out_pos)
    return max(held, key=held.__getitem__), fits


def _fit_path(
    x: Any, target: _Target, folds: list[tuple[np.ndarray, np.ndarray]], penalties: Sequence[float]
) -> tuple[tuple[float, float], float, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    n = x.shape[0]
    scores = np.zeros((n, target.n_values), np.float32)
    # no fold's rows choose the penalty of the learner that scores them (the best of the grid on
    # them would flatter their scores, which calibrate): the first fold's rows choose every other
    # fold's, the second fold's choose the first's
    c, first = _path(x, target, folds[0], penalties)
    c_first, second = _path(x, target, folds[1], penalties)
    # the first two folds' learners come from their own warm-started paths; the other folds start
    # from zero: a start fitted on another fold's rows, which hold theirs, would carry their
    # held-out labels into their scores wherever L-BFGS stops short of the optimum
    fits = [first[c_first], second[c], *(_fit_linear(x, target, fit_pos, c) for fit_pos, _ in folds[2:])]
    for (w, b), (_, out_pos) in zip(fits, folds, strict=True):
        scores[out_pos] = x[out_pos] @ w + b
    normalised = _normalised(scores, target.softmax)
    return (c, c_first), _average_precision(normalised, target, np.arange(n)), normalised, fits


def unlearned_values(
    labels: EncodedLabels, rows: np.ndarray, taxonomy: Taxonomy, folds: list[tuple[np.ndarray, np.ndarray]]
) -> dict[str, tuple[str, ...]]:
    """Per attribute (those with any), the values some cross-fit fold model of the training
    ``rows`` (``folds``: positions in them) scores out of fold without having learned them
    (:func:`_unlearned`): their out-of-fold scores cannot calibrate what the served model, which
    learned them, writes. Any cross-fitted model's, the stack's or a network's."""
    train = labels.subset(rows)
    found = {}
    for attr in taxonomy:
        out = _unlearned(_target(train, attr.name, len(attr.values)), folds)
        values = tuple(v for v, o in zip(attr.values, out, strict=True) if o)
        if values:
            found[attr.name] = values
    return found


def _unlearned(target: _Target, folds: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``(V,)`` the values some fold model scores out of fold without having learned them: its fit
    rows never have the value (or, multi-label, always have it), so :func:`_fit_linear` fixes its
    logit at -/+ :data:`_ABSENT`, yet a product of the fold says otherwise - every training product
    with the value (multi-label: or without it) sits in that fold."""
    out = np.zeros(target.n_values, bool)
    for fit_pos, out_pos in folds:
        fit_y, out_y = (target.y[rows[target.known[rows]]] for rows in (fit_pos, out_pos))
        if target.softmax:
            fit_has, out_has = (np.bincount(y, minlength=target.n_values) > 0 for y in (fit_y, out_y))
            out |= out_has & ~fit_has
        else:
            fit_y, out_y = fit_y > 0, out_y > 0
            always = fit_y.all(axis=0) & (len(fit_y) > 0)
            out |= (~fit_y.any(axis=0) & out_y.any(axis=0)) | (always & ~out_y.all(axis=0))
    return out


def _average_precision(z: np.ndarray, target: _Target, rows: np.ndarray) -> float:
    """Average precision (:func:`catalog_enrichment.metrics.attribute_average_precision`) of normalised
    scores ``z`` (one row per entry of ``rows``, the target's rows) over the labelled ones."""
    known = target.known[rows]
    kind: AttributeKind = "multiclass" if target.softmax else "multilabel"
    ap = attribute_average_precision(z[known], target.y[rows][known], kind)
    return 0.0 if np.isnan(ap) else ap


def _normalised(scores: np.ndarray, softmax: bool) -> np.ndarray:
    t = torch.from_numpy(scores)
    return (torch.log_softmax(t, dim=-1) if softmax else t).numpy()


def _fit_meta(
    z: np.ndarray, present: np.ndarray, target: _Target, rows: np.ndarray, blocks: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mix (blocks,), per-value weights (blocks, V), bias (V,))``: the meta-learner over ``z``
    ``(blocks, n, V)`` on ``rows``. Each value weighs a block by the block's shared weight plus its
    own part, which a stronger penalty holds near 0 (:data:`_VALUE_L2`): a value that one block
    tells better than the others leans on it. Where none of the rows is labelled for the attribute,
    the blocks' mean (nothing to learn from, and with no labelled product to calibrate on, nothing
    is written)."""
    rows = rows[target.known[rows]]
    mix = torch.full((z.shape[0],), 1.0 / z.shape[0], dtype=torch.float64, requires_grad=True)
    own = torch.zeros(z.shape[0], z.shape[2], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(z.shape[2], dtype=torch.float64, requires_grad=True)
    if rows.size:
        zt = torch.from_numpy(z[:, rows]).double()
        gate = torch.from_numpy(present[rows])
        kind = "multiclass" if target.softmax else "multilabel"
        y = torch.from_numpy(target.y[rows])
        optimizer = torch.optim.LBFGS([mix, own, bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits, _ = stack_scores(list(zt), gate, mix[:, None] + own, bias, kind, blocks)
            if target.softmax:
                loss = torch.nn.functional.cross_entropy(logits, y)
            else:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.double())
            loss = loss + _META_L2 * (mix.square().sum() + bias.square().mean())
            loss = loss + _VALUE_L2 * own.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    mix_, own_, bias_ = (t.detach().float().numpy() for t in (mix, own, bias))
    return mix_, own_, bias_


def _meta_probs(
    z: np.ndarray,
    present: np.ndarray,
    meta: tuple[np.ndarray, np.ndarray, np.ndarray],
    kind: str,
    blocks: Sequence[str],
) -> np.ndarray:
    mix, own, bias = (torch.from_numpy(a) for a in meta)
    _, p = stack_scores(
        list(torch.from_numpy(z)), torch.from_numpy(present), mix[:, None] + own, bias, kind, blocks
    )
    return p.numpy()


def _standardise(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, scale)`` over ``rows``: each feature standardised and the block divided by the square
    root of its width, so a row's norm is about 1 whatever the block (as an n-gram row's is)."""
    mean = x[rows].mean(axis=0) if rows.size else np.zeros(x.shape[1], np.float32)
    sd = x[rows].std(axis=0) if rows.size else np.ones(x.shape[1], np.float32)
    scale = np.where(sd > 1e-6, sd, 1.0) * np.sqrt(x.shape[1])
    return mean.astype(np.float32), scale.astype(np.float32)


def fit_stack(
    model: MultimodalModel,
    embeddings: Embeddings,
    plan: FoldPlan,
    taxonomy: Taxonomy,
    *,
    say: Say,
    penalties: Sequence[float] = PENALTIES,
) -> StackFit:
    """Fit ``model``'s stack fusion (in place) on the plan's rows of the embedded products, cross-fitted
    over the plan's folds; the returned out-of-fold scores are in row order.
    """
    labels, train = plan.labels, plan.rows
    fusion = model.fusion
    assert isinstance(fusion, StackFusion)
    tensors = embeddings.tensors
    present = tensors["image_present"].float().numpy()
    image = tensors["image_pooled"].float().numpy()
    # vocabulary, IDF and standardisation come from every training row: no label is read
    vocabulary, idf = document_frequency(embeddings.lexical[train])
    with_image = train[present[train] > 0]
    blocks: dict[str, Any] = {"ngrams": tfidf(embeddings.lexical, vocabulary, idf)}
    scaling: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    order = fusion.blocks
    dense = [("text", tensors["text_pooled"].float().numpy(), train)]
    dense += [(block, x, with_image) for block, x in fusion.image_blocks(image).items()]
    for block, x, rows in dense:
        # a product whose vector is not finite (an encoder's overflow) stands at the block's mean:
        # one NaN would turn every product's standardised feature NaN and fail the fit
        broken = ~np.isfinite(x).all(axis=1)
        scaling[block] = _standardise(x, rows[~broken[rows]])
        with np.errstate(invalid="ignore"):
            blocks[block] = np.where(broken[:, None], 0.0, (x - scaling[block][0]) / scaling[block][1])
        if broken[train].any():
            say(f"stack: {int(broken[train].sum()):,} training products' {block} vectors are not finite: "
                "they count as the block's mean")  # fmt: skip
    widths = ", ".join(f"{b} {blocks[b].shape[1]:,}" for b in order)
    say(f"stack: {vocabulary.size:,} n-grams; blocks {widths}")
    fold_rows = plan.folds()
    n, total = len(train), int(fusion.offsets[-1])
    served = {
        b: (np.zeros((blocks[b].shape[1], total), np.float32), np.zeros(total, np.float32)) for b in order
    }
    oof_probs: dict[str, np.ndarray] = {}
    chosen: dict[str, dict[str, tuple[float, float]]] = {a.name: {} for a in taxonomy}
    mixes: dict[str, dict[str, float]] = {}
    targets = [
        _target(labels.subset(train), a.name, fusion.offsets[k + 1] - fusion.offsets[k])
        for k, a in enumerate(taxonomy)
    ]
    for k, attr in enumerate(taxonomy):
        partial = labels.partial.get(attr.name)
        if partial is not None:
            used = int((targets[k].known & ~labels.known[attr.name][train]).sum())
            said = int((partial[train] != 0).sum())
            say(
                f"stack: {attr.name}: {used:,} values people confirmed train as labels; "
                f"{said - used:,} of their verdicts do not (rejections, several values a product)"
            )
    left_out = unlearned_values(labels, train, taxonomy, fold_rows)
    for name, values in left_out.items():
        say(f"stack: {name}: {', '.join(values)}: {UNLEARNED}")
    z = [np.zeros((len(order), n, t.n_values), np.float32) for t in targets]
    # every (attribute, block) fit in one pool, the costliest first, so the workers finish together
    jobs = sorted(
        ((k, b) for k in range(len(targets)) for b in range(len(order))),
        key=lambda j: -_cost(blocks[order[j[1]]], targets[j[0]]),
    )
    with _quiet_worker_restarts():
        fitted = Parallel(n_jobs=_JOBS, return_as="generator")(
            delayed(_fit_block)(blocks[order[b]][train], targets[k], fold_rows, penalties) for k, b in jobs
        )
        for (k, b), ((c, c_first), held, scores, fits, seconds) in zip(jobs, fitted, strict=True):
            name, block = taxonomy.names[k], order[b]
            lo, hi = fusion.offsets[k], fusion.offsets[k + 1]
            z[k][b] = scores
            chosen[name][block] = (c, c_first)
            weight, bias = served[block]
            weight[:, lo:hi] = np.mean([w for w, _ in fits], axis=0)
            bias[lo:hi] = np.mean([bb for _, bb in fits], axis=0)
            say(f"stack: {name} / {block}: C {c:g} (first fold {c_first:g}), out-of-fold average "
                f"precision {held:.3f} ({seconds:.0f} s)")  # fmt: skip
    for k, attr in enumerate(taxonomy):
        lo, hi = fusion.offsets[k], fusion.offsets[k + 1]
        target = targets[k]
        fusion.single[k] = attr.kind == "multilabel" and target.softmax
        kind = "multiclass" if target.softmax else "multilabel"
        gate = present[train]
        probs = np.zeros((n, hi - lo), np.float32)
        for fit_pos, out_pos in fold_rows:  # the meta-learner cross-fitted: honest out-of-fold scores
            meta = _fit_meta(z[k], gate, target, fit_pos, order)
            probs[out_pos] = _meta_probs(z[k][:, out_pos], gate[out_pos], meta, kind, order)
        oof_probs[attr.name] = probs
        mix, own, bias = _fit_meta(z[k], gate, target, np.arange(n), order)
        with torch.no_grad():
            fusion.mix[k] = torch.from_numpy(mix)
            fusion.meta_weight[:, lo:hi] = torch.from_numpy(own)
            fusion.meta_bias[lo:hi] = torch.from_numpy(bias)
        mixes[attr.name] = {block: round(float(m), 4) for block, m in zip(order, mix, strict=True)}
    _install(fusion, vocabulary, idf, scaling, served, nfkc=embeddings.lexical_nfkc)
    return StackFit(model, Predictions(oof_probs, None, {}), chosen, mixes, left_out)


def _install(
    fusion: StackFusion,
    vocabulary: np.ndarray,
    idf: np.ndarray,
    scaling: dict[str, tuple[np.ndarray, np.ndarray]],
    served: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    nfkc: bool,
) -> None:
    """The fitted numbers into the fusion's parameters and buffers, and how its n-grams were
    counted (``nfkc``: on NFKC-normalised texts), as serving must count them."""
    param: Callable[[np.ndarray], torch.nn.Parameter] = lambda a: torch.nn.Parameter(  # noqa: E731
        torch.from_numpy(np.ascontiguousarray(a, np.float32)), requires_grad=False
    )
    with torch.no_grad():
        fusion.lex_rows.fill_(-1)
        fusion.lex_rows[torch.from_numpy(vocabulary)] = torch.arange(vocabulary.size)
        fusion.lex_idf = torch.from_numpy(idf)
        fusion.lex_nfkc.fill_(nfkc)
        fusion.lex_weight, fusion.lex_bias = param(served["ngrams"][0]), param(served["ngrams"][1])
        for block in scaling:
            mean, scale = scaling[block]
            setattr(fusion, f"{block}_mean", torch.from_numpy(mean))
            setattr(fusion, f"{block}_scale", torch.from_numpy(scale))
            setattr(fusion, f"{block}_weight", param(served[block][0]))
            setattr(fusion, f"{block}_bias", param(served[block][1]))


def stacked(
    model: MultimodalModel, embeddings: Embeddings, plan: FoldPlan, taxonomy: Taxonomy, say: Say
) -> tuple[tuple[Predictions, EncodedLabels], list[FitResult]]:
    """The pipeline's fit of a stack (:func:`fit_stack`, ``model`` fitted in place): its out-of-fold
    scores over the plan's rows with their labels (the calibration set), and what it chose (with
    the values those scores cannot calibrate, ``unlearned``)."""
    from catalog_enrichment.training.fit import FitResult

    fit = fit_stack(model, embeddings, plan, taxonomy, say=say)
    chosen = {"penalties": fit.penalties, "mix": fit.mix, "unlearned": fit.unlearned}
    return (fit.oof, plan.labels.subset(plan.rows)), [FitResult([], 0, chosen)]
