"""The promotion gate: should ``challenger`` replace ``champion``?

Both versions are scored on a frozen evaluation set (a labelled table at a pinned version) with
their own calibrated thresholds. The gate judges with confidence bounds, not point estimates, so an
honest model is not a coin flip at the boundary:

(a) precision: the challenger is rejected on an attribute whose realized precision on the
    evaluation set is *significantly* below the target — its one-sided exact (Clopper-Pearson) upper
    bound (at ``confidence``) below the target, however few values it wrote; it is rejected too when it
    writes nothing at all;
(b) coverage (when a champion exists): per attribute, the paired change in coverage on the same
    products (challenger minus champion) must not be significantly worse than ``-max_coverage_loss``:
    the challenger is rejected when the one-sided upper bound of the change is below it. An
    attribute the champion writes and the challenger does not score counts as covered nowhere.

A challenger no worse than the champion within noise is promoted (a retrained model on fresher data
is the point of the schedule). A version ``rollback --model-version`` tagged rolled back is never
promoted; a rolled-back champion, or one whose files the artifact store no longer holds (no run can
serve it either), is not compared (the challenger is judged alone); one the store cannot give now,
or one a later version of this package wrote and this one cannot load, is an error (run it again;
promote with that version). The decision
and every reason are recorded as tags on the challenger version and appended to the promotion log
(a Delta table: MLflow aliases keep no history, so the log is the audit trail). A promotion whose
record a failure cut short after the alias moved is recorded by the next ``promote`` (a retry).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from catalog_enrichment.calibration import clopper_pearson_lower, version_target
from catalog_enrichment.catalog.lakehouse import is_delta, pinned_version, read_table, write_table
from catalog_enrichment.catalog.lock import catalog_lock
from catalog_enrichment.config import CalibrationConfig, PromotionConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import encode_labels
from catalog_enrichment.data.images import ImagePolicy
from catalog_enrichment.errors import CatalogEnrichError, DecoderMismatch, TaxonomyError, UnservableBundle
from catalog_enrichment.metrics import (
    attribute_r_at_p,
    coverage_efficiency,
    paired_change,
    written_precision_and_coverage,
)

__all__ = [
    "CoverageChange",
    "Evaluation",
    "EvaluationSet",
    "GateResult",
    "GateRule",
    "compare_coverage",
    "evaluate_bundle",
    "gate",
    "promote",
    "read_promotion_log",
]

AttributeMetrics = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class GateResult:
    """``promote`` and the reasons, one line per check (pass or fail)."""

    promote: bool
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CoverageChange:
    """Challenger vs champion coverage of one attribute on the same products.

    ``delta`` = challenger - champion coverage; ``upper`` its one-sided upper confidence bound.
    """

    champion: float
    delta: float
    upper: float


def gate(
    challenger: AttributeMetrics,
    changes: Mapping[str, CoverageChange] | None,
    *,
    target: float,
    max_coverage_loss: float,
    confidence: float = 0.95,
) -> GateResult:
    """Pure decision (module docstring) from the challenger's per-attribute ``{"precision",
    "coverage", "written", "correct"}`` (and ``"labelled"``, the products labelled for it) and,
    when a champion exists, the coverage changes of the attributes both have."""
    reasons: list[str] = []
    ok = True
    for attr, m in challenger.items():
        n, k = int(m["written"]), int(m["correct"])
        if m.get("labelled", 1) == 0:
            reasons.append(f"{attr}: no product of the evaluation set is labelled for it: not checked")
            continue
        if n == 0:
            reasons.append(f"{attr}: writes nothing (precision check not applicable)")
            continue
        # exact: Wilson's bound falls below 0.95 for 7-14 % of honest attributes at a few writes
        upper = 1.0 - float(clopper_pearson_lower(n - k, n, confidence=confidence))
        if upper < target:
            ok = False
            reasons.append(
                f"FAIL {attr}: realized precision {k / n:.4f} ({k}/{n}) is significantly below the target "
                f"{target} (upper bound {upper:.4f})"
            )
        else:
            reasons.append(f"ok {attr}: realized precision {k / n:.4f} ({k}/{n}), upper bound {upper:.4f}")
    if all(m["written"] == 0 for m in challenger.values()):
        return GateResult(
            False, [*reasons, "FAIL overall: the challenger writes nothing on the evaluation set"]
        )
    if changes is None:
        reasons.append("no champion yet: precision alone decides")
        return GateResult(ok, reasons)
    for attr, m in challenger.items():
        c = changes.get(attr)
        if c is None:  # an attribute (or a value grouping) the champion does not have
            reasons.append(
                f"ok {attr}: coverage {m['coverage']:.4f}, new (the champion has no such attribute)"
            )
            continue
        line = (
            f"{attr}: coverage {m['coverage']:.4f} vs champion {c.champion:.4f} "
            f"(change {c.delta:+.4f}, upper bound {c.upper:+.4f})"
        )
        if c.upper < -max_coverage_loss:
            ok = False
            reasons.append(f"FAIL {line} is significantly worse than -{max_coverage_loss}")
        else:
            reasons.append(f"ok {line}")
    for attr, c in changes.items():
        if attr in challenger:
            continue
        line = f"{attr}: the challenger does not score it, the champion covers {c.champion:.4f}"
        if c.upper < -max_coverage_loss:
            ok = False
            reasons.append(f"FAIL {line} (upper bound {c.upper:+.4f})")
        else:
            reasons.append(f"ok {line}")
    return GateResult(ok, reasons)


@dataclass(frozen=True)
class Evaluation:
    """A bundle on the evaluation set: per-attribute metrics, which products got a value
    (``covered``) and which are labelled for the attribute under the bundle's taxonomy
    (``labelled``), each over every product of the set."""

    metrics: dict[str, dict[str, float]]
    covered: dict[str, np.ndarray]
    labelled: dict[str, np.ndarray]


def evaluate_bundle(
    bundle: Any, table: pa.Table, image_policy: ImagePolicy, allowed: Taxonomy | None = None
) -> Evaluation:
    """Realized precision, coverage, recall, R@P95 and coverage efficiency of what the enrichment
    job would write with a bundle on a labelled table (its ``image_uri`` read under
    ``image_policy``): its thresholds under the job's decision rules (value groups, one value of a
    single-valued attribute, what the configured taxonomy ``allowed`` keeps out, nothing for a
    product whose image cannot be used or that the model scores NaN).

    Raises:
        TaxonomyError: the bundle does not fit the configured taxonomy (every run would refuse it).
    """
    from catalog_enrichment.inference.decide import DecisionPolicy
    from catalog_enrichment.inference.predictor import BatchPredictor, PredictorOptions

    policy = DecisionPolicy(bundle.taxonomy, bundle.calibration, allowed or bundle.taxonomy)
    # a label the version's taxonomy lacks (a value added since) leaves that product unlabelled for it
    labels = encode_labels(table, bundle.taxonomy, outside="unknown").derive(bundle.taxonomy)
    # a product whose image cannot be used or that scores NaN is quarantined by the job: not written
    scored = BatchPredictor(bundle, PredictorOptions(image_policy=image_policy)).score_arrow(table).finite()
    scores, failed = scored.probs, np.array([e is not None for e in scored.image_error], bool)
    n = table.num_rows
    flat = policy.decide_flat(scores, np.zeros((n, len(policy.taxonomy.names)), bool), failed)
    every = np.zeros((n, len(policy.all_values)), bool)
    every[np.repeat(np.arange(n), np.diff(flat.offsets)), flat.value] = True
    metrics, covered, labelled = {}, {}, {}
    start = 0
    for attr in policy.taxonomy:  # derived attributes too
        decided, start = every[:, start : start + len(attr.values)], start + len(attr.values)
        covered[attr.name] = np.asarray(decided.any(axis=1))
        target = labels.targets[attr.name]
        labelled[attr.name] = labels.known[attr.name] if target.ndim == 2 else target >= 0
        s, y = labels.labelled(scores, attr.name)
        if y.ndim == 2:  # multi-label: the labelled products only (multi-class keeps every row)
            decided = decided[labels.known[attr.name]]
        thresholds = policy.thresholds[attr.name]
        m = written_precision_and_coverage(s, y, attr.kind, thresholds, written=decided)
        r = attribute_r_at_p(s, y, attr.kind).pooled
        metrics[attr.name] = {
            "labelled": float(labelled[attr.name].sum()),
            "precision": float(m["precision"]),
            "coverage": float(m["coverage"]),
            "written": float(m["written"]),
            "correct": float(m["correct"]),
            "recall": float(m["recall"]),
            "r_at_p95": float(r),
            "coverage_efficiency": coverage_efficiency(m["recall"], r),
        }
    return Evaluation(metrics, covered, labelled)


def compare_coverage(
    challenger: Evaluation, champion: Evaluation, *, confidence: float = 0.95
) -> dict[str, CoverageChange]:
    """Paired coverage change per attribute the champion writes, over the products labelled for it
    under both versions' taxonomies (same products, same order); an attribute the challenger lacks
    is covered by it nowhere."""
    out = {}
    for attr, old_covered in champion.covered.items():
        if attr not in challenger.covered:  # the challenger dropped it: every product lost
            both = champion.labelled[attr]
            new, old = np.zeros(int(both.sum()), bool), old_covered[both]
        else:
            both = challenger.labelled[attr] & champion.labelled[attr]
            new, old = challenger.covered[attr][both], old_covered[both]
        delta, upper = paired_change(new, old, confidence=confidence)
        out[attr] = CoverageChange(float(old.mean()) if old.size else 0.0, delta, upper)
    return out


_LOG_SCHEMA = pa.schema(
    [
        ("decided_at", pa.timestamp("us", tz="UTC")),
        ("registered_model", pa.string()),
        ("challenger_version", pa.string()),
        ("champion_version", pa.string()),
        ("promoted", pa.bool_()),
        ("dry_run", pa.bool_()),
        ("eval_data", pa.string()),
        ("eval_version", pa.string()),
        ("reasons", pa.list_(pa.string())),
        ("metrics", pa.string()),
    ]
)


def read_promotion_log(path: str | Path) -> pa.Table:
    return read_table(path)


@dataclass(frozen=True)
class GateRule:
    """What the gate holds a challenger to (module docstring): ``configured_target`` is the config's
    ``calibration.target_precision``, which must agree with the target the challenger was
    calibrated for."""

    configured_target: float
    max_coverage_loss: float
    confidence: float = 0.95

    @classmethod
    def from_config(cls, promotion: PromotionConfig, calibration: CalibrationConfig) -> GateRule:
        return cls(calibration.target_precision, promotion.max_coverage_loss, calibration.confidence)


@dataclass(frozen=True)
class EvaluationSet:
    """The frozen evaluation set: a labelled Delta table, pinned to ``version`` (None: its latest),
    its ``image_uri`` read under ``image_policy`` (None: files under the table's own folder);
    ``taxonomy``: the catalog's configured one, which the enrichment job's decisions follow (None:
    each version's own)."""

    path: Path
    version: int | None = None
    image_policy: ImagePolicy | None = None
    taxonomy: Taxonomy | None = None


def promote(
    client: Any,
    registered_model: str,
    evaluation: EvaluationSet,
    rule: GateRule,
    *,
    log_path: str | Path,
    dry_run: bool = False,
    progress: Any = print,
    lock_wait_seconds: float = 600,
) -> dict[str, Any]:
    """Run the gate for ``challenger`` vs ``champion`` of ``registered_model`` (see module docstring)
    on ``evaluation`` under ``rule``; the decision is recorded (``log_path``) unless ``dry_run``,
    waiting up to ``lock_wait_seconds`` for another promotion recording into the same log."""
    from catalog_enrichment import registry

    registry.check_tracking_server(client)
    challenger, champion = _aliases(client, registered_model)
    eval_data = evaluation.path
    table, pinned = _evaluation_set(eval_data, evaluation.version)
    progress(
        f"evaluating challenger v{challenger}"
        + (f" and champion v{champion}" if champion else "")
        + f" on {eval_data} (version {pinned}, {table.num_rows:,} products)"
    )
    bundle = registry.load_bundle_from_uri(f"models:/{registered_model}/{challenger}")
    target = version_target(
        rule.configured_target, bundle.calibration.target_precision, f"{registered_model} v{challenger}"
    )
    policy = evaluation.image_policy or ImagePolicy(roots=(str(eval_data),))
    rolled_back = {  # `rollback --model-version` removed what these wrote
        v: why
        for v in {challenger, champion} - {None}
        if (why := registry.version_tags(client, registered_model, str(v)).get(registry.ROLLED_BACK_TAG))
    }
    champion_bundle, alone = None, None  # alone: why a champion is not compared
    if champion is not None and champion != challenger:
        if champion in rolled_back:
            alone = f"the champion v{champion} was rolled back ({rolled_back[champion]})"
        else:
            try:
                champion_bundle = registry.load_bundle_from_uri(f"models:/{registered_model}/{champion}")
            except UnservableBundle as exc:
                # a later version's runs serve it (its gate compares the two); another decoder:
                # this machine is at fault, not the champion
                machine = isinstance(exc, DecoderMismatch)
                if exc.by_later or machine:
                    raise CatalogEnrichError(
                        f"the champion v{champion} cannot be compared "
                        f"{'on this machine' if machine else 'with this version'} ({exc}); nothing promoted"
                    ) from None
                alone = f"the champion v{champion} cannot be loaded ({exc})"  # a challenger is the remedy
        theirs = None if champion_bundle is None else champion_bundle.calibration.target_precision
        if theirs is not None and abs(theirs - target) > 1e-12:  # every run refuses it (version_target)
            alone = f"the champion v{champion} was calibrated for {theirs}, not {target}"
            champion_bundle = None
    notes: list[str] = []  # what the check of the challenger's labels could not check: recorded too

    def note(message: str) -> None:
        progress(message)
        notes.append(message.strip().strip("()"))

    apart = _trained_apart(client, registered_model, challenger, eval_data, pinned, note)
    result, metrics = _judge(bundle, champion_bundle, table, policy, rule, target, evaluation.taxonomy)
    result = GateResult(result.promote, [*result.reasons, *notes])
    if alone is not None:
        kept = [r for r in result.reasons if not r.startswith("no champion yet")]
        result = GateResult(result.promote, [*kept, f"{alone}: coverage not compared"])
    if apart is not None:
        result = GateResult(False, [apart])
    if challenger in rolled_back:
        result = GateResult(False, [f"challenger v{challenger} was rolled back ({rolled_back[challenger]})"])
    if champion == challenger:
        result = GateResult(False, ["challenger is already champion: nothing to do"])
        if not dry_run:  # a retry of a promotion that moved the alias and failed before its record
            finished = _finish_record(
                client, registered_model, challenger, metrics, log_path, progress, lock_wait_seconds
            )
            if finished is not None:
                result = GateResult(False, [f"challenger is already champion: {finished}"])
    summary = {
        "registered_model": registered_model, "challenger": challenger, "champion": champion,
        "promote": result.promote, "reasons": result.reasons, "target": target, "metrics": metrics,
        "dry_run": dry_run, "eval_data": str(eval_data), "eval_version": pinned,
    }  # fmt: skip
    if not dry_run and champion is not None and champion != challenger:
        # a promotion of the champion whose record a failure cut short, and a training registered
        # this challenger before its retry: recorded first, so the log says how the champion got there
        theirs = {"challenger": metrics["champion"]} if "champion" in metrics else {}
        _finish_record(client, registered_model, champion, theirs, log_path, progress, lock_wait_seconds)
    if not dry_run and champion != challenger:  # a version is not judged against itself: no record
        _record(client, summary, dt.datetime.now(dt.UTC), log_path, progress, lock_wait_seconds)
    return summary


def _trained_apart(
    client: Any, name: str, challenger: str, eval_data: str | Path, pinned: int | None, say: Any
) -> str | None:
    """Why ``challenger`` may have trained on products of the evaluation set (``eval_data`` at
    ``pinned``): the labels it trained on (its ``data.*`` tags) left out another version of it,
    another set, or none. None where they left out this one, or where the training table is not
    one ``labels`` wrote (then not checked, and said)."""
    from catalog_enrichment import registry
    from catalog_enrichment.catalog.labels import labels_sources

    tags = registry.version_tags(client, name, str(challenger))
    path, version = tags.get("data.path"), tags.get("data.version")
    sources = labels_sources(path, int(version)) if path and version else None
    if sources is None:
        say(f"  (v{challenger} trained on {path or 'a table not recorded'}, which `labels` did not write: "
            "whether it left out the evaluation set is not checked)")  # fmt: skip
        return None
    left, here = sources.get("evaluation"), {"path": str(Path(eval_data).resolve()), "version": pinned}
    if left == here:
        if pinned is None:
            say(f"  (the evaluation set {eval_data} is not a Delta table: the labels of v{challenger} left "
                "out its path, whether they left out its rows as they are now is not checked)")  # fmt: skip
        return None
    what = "no evaluation set" if not left else f"{left['path']} at version {left['version']}"
    return (
        f"challenger v{challenger} trained on labels ({path}, version {version}) that left out {what}, "
        f"not {here['path']} at version {pinned}: it may have trained on products it would be judged "
        "on (run labels with this evaluation set, then train)"
    )


def _aliases(client: Any, registered_model: str) -> tuple[str, str | None]:
    """The challenger's version (it must exist) and the champion's (None: none yet)."""
    from catalog_enrichment import registry

    challenger = registry.resolve_alias(client, registered_model, registry.CHALLENGER)
    if challenger is None:
        raise CatalogEnrichError(
            f"registered model {registered_model!r} has no '{registry.CHALLENGER}' alias; "
            "run 'catalog-enrich train' first"
        )
    return challenger, registry.resolve_alias(client, registered_model, registry.CHAMPION)


def _judge(
    challenger: Any,
    champion: Any,
    table: pa.Table,
    policy: ImagePolicy,
    rule: GateRule,
    target: float,
    allowed: Taxonomy | None,
) -> tuple[GateResult, dict[str, Any]]:
    """The gate's decision on the challenger bundle (against the champion's, when there is one) on
    the evaluation set, and the metrics it rests on."""
    evaluations = {"challenger": evaluate_bundle(challenger, table, policy, allowed)}
    changes, unfit = None, None
    if champion is not None:
        try:
            evaluations["champion"] = evaluate_bundle(champion, table, policy, allowed)
        except TaxonomyError as exc:  # every run refuses it already: the challenger is what is needed
            unfit = f"the champion does not fit the configured taxonomy ({exc}): coverage not compared"
        else:
            changes = compare_coverage(
                evaluations["challenger"], evaluations["champion"], confidence=rule.confidence
            )
    result = gate(
        evaluations["challenger"].metrics,
        changes,
        target=target,
        max_coverage_loss=rule.max_coverage_loss,
        confidence=rule.confidence,
    )
    if unfit is not None:
        kept = [r for r in result.reasons if not r.startswith("no champion yet")]
        result = GateResult(result.promote, [*kept, unfit])
    metrics: dict[str, Any] = {name: e.metrics for name, e in evaluations.items()}
    if changes is not None:
        metrics["coverage_change"] = {a: asdict(c) for a, c in changes.items()}
    return result, metrics


def _evaluation_set(eval_data: str | Path, eval_version: int | None) -> tuple[pa.Table, int | None]:
    """The frozen evaluation set, a Delta table pinned to a version (its latest by default)."""
    pinned = pinned_version(eval_data, eval_version, "promotion.eval_version")
    return read_table(eval_data, version=pinned), pinned


# The tag a promotion writes, with the rest of its judgement, before it moves the alias: when it was
# decided (empty for a rejection). A retry finds it where the log has no row for that decision.
PROMOTING_TAG = "promotion.promoting"


def _decision_lock(log_path: str | Path, owner: str, wait_seconds: float, say: Any) -> Any:
    """Promotions recording into one log decide one at a time: an exclusive lock beside it
    (:func:`~catalog_enrichment.catalog.lock.catalog_lock`), held from the check of what the gate
    judged to the log row, so a promotion never moves the alias from a champion another one
    replaced after that check."""
    log = Path(log_path)
    return catalog_lock(
        log.parent, owner=owner, wait_seconds=wait_seconds, say=say, name=f"_{log.name}_lock",
        guards=f"the promotion log {log.name} in",
    )  # fmt: skip


def _record(
    client: Any,
    summary: dict[str, Any],
    decided: dt.datetime,
    log_path: str | Path,
    say: Any,
    lock_wait_seconds: float = 600,
) -> None:
    """The decision, under the promotion log's lock (:func:`_decision_lock`, waiting up to
    ``lock_wait_seconds``): tags on the challenger, the champion alias moved (a promotion), then the
    ``promotion.decision`` tag and a row in the promotion log. What the gate judged is checked
    again before any of it - the champion it compared with is still the champion, the challenger
    was not rolled back meanwhile (its values removed while it was judged) - and nothing is
    recorded where that check fails.

    Crash-safe in this order: (1) the judgement tags (reasons, evaluation set, ``champion_before``,
    when, and for a promotion :data:`PROMOTING_TAG`) - a failure here leaves the alias where it
    was, so a retry judges again and overwrites them; (2) the alias move - where it fails (and the
    alias, read again, did not move), no decision tag or log row says promoted; (3) the decision
    tag, then the log row, always last - a failure before the row leaves the challenger champion
    with its judgement tagged, and a retry (the challenger is then already champion) finishes the
    record from those tags (:func:`_finish_record`); a row present means the record is complete."""
    name, challenger = summary["registered_model"], summary["challenger"]
    with _decision_lock(log_path, f"promote v{challenger} of {name}", lock_wait_seconds, say):
        _decide(client, summary, decided, log_path, say)


def _decide(
    client: Any, summary: dict[str, Any], decided: dt.datetime, log_path: str | Path, say: Any
) -> None:
    """:func:`_record`'s steps, under the lock."""
    from catalog_enrichment import registry

    name, challenger, champion = summary["registered_model"], summary["challenger"], summary["champion"]
    why = summary["promote"] and registry.version_tags(client, name, str(challenger)).get(
        registry.ROLLED_BACK_TAG
    )
    if why:
        raise CatalogEnrichError(
            f"challenger v{challenger} of {name!r} was rolled back while this promotion ran ({why}); "
            "nothing was recorded and it is not promoted"
        )
    now = registry.resolve_alias(client, name, registry.CHAMPION)
    if now != champion:  # another promotion moved it meanwhile: this one compared with the wrong version
        raise CatalogEnrichError(
            f"'{registry.CHAMPION}' of {name!r} moved from {champion or 'none'} to {now} while this "
            f"promotion ran; nothing was recorded: run promote again to compare v{challenger} with v{now}"
        )
    pinned = "" if summary["eval_version"] is None else str(summary["eval_version"])
    registry.tag_version(
        client,
        name,
        challenger,
        {
            "promotion.reasons": registry.json_tag(summary["reasons"], "the promotion log has every one"),
            "promotion.eval_data": summary["eval_data"],
            "promotion.eval_version": pinned,
            "promotion.champion_before": champion or "",
            "promotion.decided_at": decided.isoformat(),
            "promotion.decision": "",  # an earlier judgement's, until this one's is recorded
            PROMOTING_TAG: decided.isoformat() if summary["promote"] else "",
        },
    )
    if summary["promote"]:
        try:
            registry.set_alias(client, name, registry.CHAMPION, challenger)
        except Exception as exc:
            now = None  # the move's answer may be lost where the move itself was made
            with contextlib.suppress(Exception):
                now = registry.resolve_alias(client, name, registry.CHAMPION)
            if now != str(challenger):  # not promoted: no retry may take the version's judgement for one
                with contextlib.suppress(Exception):
                    registry.tag_version(client, name, challenger, {PROMOTING_TAG: ""})
                raise
            say(
                f"moving '{registry.CHAMPION}' failed ({exc}), but it now points at v{challenger}: "
                "recording the promotion"
            )
    try:
        _write_decision(client, summary, decided, log_path)
    except Exception as exc:
        if not summary["promote"]:
            raise
        raise CatalogEnrichError(
            f"promoted version {challenger} to '{registry.CHAMPION}' (from {champion or 'none'}), but "
            f"the decision could not be recorded in the tags or {log_path}: {exc} (run promote again "
            "to record it)"
        ) from exc
    if summary["promote"]:
        say(f"promoted version {challenger} to '{registry.CHAMPION}'")
    else:
        say(f"kept champion {champion}: challenger {challenger} rejected")


def _write_decision(
    client: Any, summary: Mapping[str, Any], decided: dt.datetime, log_path: str | Path
) -> None:
    """The ``promotion.decision`` tag, then the promotion log's row (it completes the record), then
    :data:`PROMOTING_TAG` cleared (a complete record needs no finishing, wherever the log is read
    from later)."""
    from catalog_enrichment import registry

    name, challenger = summary["registered_model"], summary["challenger"]
    decision = "promoted" if summary["promote"] else "rejected"
    registry.tag_version(client, name, challenger, {"promotion.decision": decision})
    row = {
        "decided_at": [decided],
        "registered_model": [name],
        "challenger_version": [challenger],
        "champion_version": [summary["champion"]],
        "promoted": [summary["promote"]],
        "dry_run": [False],
        "eval_data": [summary["eval_data"]],
        "eval_version": ["" if summary["eval_version"] is None else str(summary["eval_version"])],
        "reasons": [summary["reasons"]],
        "metrics": [json.dumps(summary["metrics"])],
    }
    write_table(log_path, pa.table(row, schema=_LOG_SCHEMA), mode="append")
    if summary["promote"]:
        registry.tag_version(client, name, challenger, {PROMOTING_TAG: ""})


def _finish_record(
    client: Any,
    name: str,
    champion: str,
    metrics: Mapping[str, Any],
    log_path: str | Path,
    say: Any,
    lock_wait_seconds: float = 600,
) -> str | None:
    """Where ``champion`` got the alias from a promotion whose record a failure cut short (its
    :data:`PROMOTING_TAG` names a decision the log has no row for), the decision tag and the log row
    written now from its judgement tags - the reasons as tagged, the metrics of this run's
    evaluation of it - and what was done; None where its record is complete (or it was not
    promoted by ``promote``). Under the promotion log's lock (:func:`_decision_lock`)."""
    with _decision_lock(log_path, f"promote v{champion} of {name}", lock_wait_seconds, say):
        return _finish(client, name, champion, metrics, log_path, say)


def _finish(
    client: Any, name: str, champion: str, metrics: Mapping[str, Any], log_path: str | Path, say: Any
) -> str | None:
    """:func:`_finish_record`'s steps, under the lock."""
    from catalog_enrichment import registry

    tags = registry.version_tags(client, name, champion)
    promoting = tags.get(PROMOTING_TAG)
    if not promoting:
        return None
    decided = dt.datetime.fromisoformat(promoting)
    if is_delta(log_path):
        log = read_table(log_path, columns=["decided_at", "registered_model", "challenger_version"])
        if {
            "decided_at": decided,
            "registered_model": name,
            "challenger_version": champion,
        } in log.to_pylist():
            return None
    before = tags.get("promotion.champion_before") or None
    again = f"v{champion} evaluated again" if metrics else "not evaluated again"
    note = (
        f"recorded by a later run: the promotion of v{champion} from {before or 'none'} decided at "
        f"{promoting} moved the alias, then failed before this row (metrics: {again})"
    )
    summary = {
        "registered_model": name, "challenger": champion, "champion": before, "promote": True,
        "reasons": [*json.loads(tags.get("promotion.reasons") or "[]"), note],
        "eval_data": tags.get("promotion.eval_data", ""), "eval_version": tags.get("promotion.eval_version"),
        "metrics": metrics,
    }  # fmt: skip
    _write_decision(client, summary, decided, log_path)
    say(f"recorded the promotion of version {champion} to '{registry.CHAMPION}' decided at {promoting}")
    return f"recorded its promotion (decided at {promoting}, from {before or 'none'}), cut short by a failure"


def format_comparison(summary: Mapping[str, Any]) -> str:
    """The comparison table printed by ``promote`` (and ``--dry-run``)."""
    metrics = summary["metrics"]
    lines = [
        f"{'':<14} {'challenger':^26} {'champion':^26}",
        f"{'attribute':<14}" + f" {'prec':>8} {'cov':>8} {'eff':>8}" * 2,
    ]

    def cells(m: Mapping[str, float] | None) -> str:
        if m is None:
            return f" {'—':>8}" * 3
        return "".join(f" {m[k]:>8.4f}" for k in ("precision", "coverage", "coverage_efficiency"))

    for attr, m in metrics["challenger"].items():
        lines.append(f"{attr:<14}" + cells(m) + cells(metrics.get("champion", {}).get(attr)))
    lines.append("(prec: realized precision, cov: share of products given a value, eff: recall / R@P95)")
    lines.append(
        "decision: "
        + ("PROMOTE" if summary["promote"] else "KEEP CHAMPION")
        + (" (dry run, nothing changed)" if summary["dry_run"] else "")
    )
    lines += [f"  {r}" for r in summary["reasons"]]
    return "\n".join(lines)
