"""What gets written: the model version's calibrated thresholds, the catalog's taxonomy, the merchant.

Pure NumPy on the predictor's scores. For every scored product and every attribute the merchant did
not fill: multi-class -> the top-1 value if it clears its threshold; multi-label -> every value that
clears its own. A derived attribute (a colour family of shades) is decided like any other, and a
value of its parent is never written outside the group written for the same product; a merchant's
value at either level keeps the model from writing the other. A value the model knows but the
configured taxonomy no longer allows is never written, nor a group whose members the configured
taxonomy changed, nor the rest of an attribute whose pooled calibration evidence without those
values no longer proves the target; a value without a threshold (too little calibration support)
is never written. A value people rejected for a product is never written for it, nor a value inside
a group they rejected for it.

:meth:`DecisionPolicy.decide_flat` decides a whole batch with array operations and returns the
decisions as flat arrays (CSR: per-row offsets into one run of written values), which the Spark
task turns into its Arrow output without a Python object per product or per value;
:meth:`DecisionPolicy.decide` gives the same decisions as Python lists.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.calibration import Calibration
from catalog_enrichment.contracts import Taxonomy, merchant_key, merchant_value_given
from catalog_enrichment.errors import TaxonomyError
from catalog_enrichment.metrics import decision_matrix, within_groups

__all__ = ["Decision", "DecisionPolicy", "FlatDecisions", "merchant_attributes", "merchant_filled"]


# a product's merchant attributes as Python gives them: a dict, the pairs of an Arrow map, or None
MerchantAttributes: TypeAlias = Mapping[str, Any] | Iterable[tuple[str, Any]] | None


def merchant_attributes(raw: MerchantAttributes) -> set[str]:
    """Attribute names a merchant filled (as given), from an Arrow map value (list of pairs) or a dict."""
    if raw is None:
        return set()
    items = raw.items() if isinstance(raw, Mapping) else raw
    return {str(k) for k, v in items if merchant_value_given(v)}


def merchant_filled(
    column: pa.Array | pa.ChunkedArray | Sequence[MerchantAttributes | AbstractSet[str]], names: Sequence[str]
) -> np.ndarray:
    """``(n, len(names))`` bool: which of ``names`` each product's merchant filled.

    ``column`` is an Arrow ``map<string, list>`` array (or ``list<struct<key, value>>``), read
    without a Python object per row; any other sequence (dicts, pair lists, None) goes through
    :func:`merchant_attributes` row by row. A key counts as filled when its value holds a value that
    is not null or blank, as in :func:`merchant_attributes`; a set is taken as the filled names
    themselves. A key is one of ``names`` written in another case, width or with spaces around it
    (:func:`merchant_key`).
    """
    wanted = [merchant_key(name) for name in names]
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    entries = _filled_entries(column) if isinstance(column, pa.Array) else None
    if entries is None:
        values = column.to_pylist() if isinstance(column, pa.Array) else column  # e.g. an all-null column
        rows = [
            {merchant_key(k) for k in (raw if isinstance(raw, AbstractSet) else merchant_attributes(raw))}
            for raw in values
        ]
        return np.array([[key in row for key in wanted] for row in rows], bool).reshape(len(rows), len(names))
    parents, keys = entries
    filled = np.zeros((len(column), len(names)), bool)
    for j, key in enumerate(wanted):
        filled[parents[keys == key], j] = True
    return filled


def _filled_entries(column: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """Row index and key (its :func:`merchant_key`) of every filled entry of a map (or
    list-of-key/value-struct) column."""
    kind = column.type
    if pa.types.is_map(kind):
        keys, items = column.keys, column.items
    elif pa.types.is_list(kind) and pa.types.is_struct(kind.value_type) and kind.value_type.num_fields == 2:
        keys, items = column.values.field(0), column.values.field(1)
    else:
        return None
    # the children are the parent's whole (unsliced) arrays: cut them to this slice's entries
    start, stop = column.offsets[0].as_py(), column.offsets[-1].as_py()
    keys, items = keys.slice(start, stop - start), items.slice(start, stop - start)
    if pa.types.is_list(items.type) or pa.types.is_large_list(items.type):
        if not pa.types.is_string(items.type.value_type):
            return None
        # an entry's values that are not null or blank, counted per entry
        given = _not_blank(items.flatten())
        owner = pc.list_parent_indices(items).to_numpy(zero_copy_only=False)
        values = np.bincount(owner[given], minlength=len(items))
    elif pa.types.is_string(items.type):
        values = _not_blank(items).astype(np.int64)
    else:
        return None
    counts = np.diff(np.asarray(column.offsets))
    parents = np.repeat(np.arange(len(column)), counts)
    keep = (values > 0) & np.repeat(column.is_valid().to_numpy(zero_copy_only=False), counts)
    names = pc.dictionary_encode(keys)  # a few names: each keyed once
    keyed = pa.array([merchant_key(k) for k in names.dictionary.to_pylist()], pa.string()).take(names.indices)
    return parents[keep], np.asarray(keyed.to_numpy(zero_copy_only=False), object)[keep]


def _not_blank(texts: pa.Array) -> np.ndarray:
    """Which of ``texts`` are neither null nor blank (not UTF-8, which validation quarantines: not
    empty)."""
    try:
        length = pc.utf8_length(pc.utf8_trim_whitespace(texts))
    except pa.ArrowInvalid:
        length = pc.binary_length(texts)
    return np.asarray(pc.fill_null(pc.greater(length, 0), False).to_numpy(zero_copy_only=False), bool)


@dataclass(frozen=True)
class FlatDecisions:
    """The decisions of ``n`` products as flat arrays.

    Written values, by product, then attribute (taxonomy order), then value (model order):
    ``offsets`` (``n + 1``) cut ``attribute`` (index into the model's attributes), ``value`` (index
    into :attr:`DecisionPolicy.all_values`, every attribute's values one after the other),
    ``confidence`` and ``threshold`` into products. ``scored``: ``(n, n_attributes)`` bool, the
    attributes each product was scored for (not merchant-filled, not skipped); ``settled``: those a
    merchant's value settles for it (filled at either level of a value group), where the catalog
    keeps no model value - a skipped product's too: its merchant's values need no image.
    """

    offsets: np.ndarray
    attribute: np.ndarray
    value: np.ndarray
    confidence: np.ndarray
    threshold: np.ndarray
    scored: np.ndarray
    settled: np.ndarray


@dataclass(frozen=True)
class Decision:
    """One written value."""

    attribute: str
    value: str
    confidence: float
    threshold: float


def _some(values: Sequence[str]) -> str:
    """Up to five values for a log line."""
    return ", ".join(values[:5]) + (f" and {len(values) - 5} more" if len(values) > 5 else "")


class DecisionPolicy:
    """Thresholds of one model version, restricted to what the configured taxonomy allows: a value it
    no longer has is not written, nor a value group whose members it changed, nor any value of an
    attribute the model scores as one distribution (multi-class or single-valued) to which it added
    values (the model would put a product of a new value on one of its own) - retrain to write them.
    Where the calibration proved an attribute's pooled precision (the attribute scope) and the
    configured taxonomy drops some of its values, the values left are written only if their own
    calibration evidence proves the target again (dropping the surest values would otherwise let
    the rest write below it).

    Raises:
        TaxonomyError: the model scores an attribute the configured taxonomy lacks, or with a
            different kind (multi-label vs multi-class).
    """

    def __init__(self, model_taxonomy: Taxonomy, calibration: Calibration, allowed: Taxonomy) -> None:
        model_taxonomy, allowed = model_taxonomy.outputs, allowed.outputs  # derived attributes too
        problems = []
        for attr in model_taxonomy:
            if attr.name not in allowed.names:
                problems.append(f"attribute {attr.name!r} is not in the configured taxonomy")
            elif allowed[attr.name].kind != attr.kind:
                problems.append(
                    f"attribute {attr.name!r} is {attr.kind} in the model but {allowed[attr.name].kind} "
                    "in the configured taxonomy"
                )
        if problems:
            raise TaxonomyError(
                "the model does not fit the configured taxonomy: "
                + "; ".join(problems)
                + " (retrain the model or fix taxonomy_path)"
            )
        self.taxonomy = model_taxonomy
        self.health = calibration.health  # the run health checks' baselines (health.py), or None
        self.target_precision = calibration.target_precision
        self.thresholds: dict[str, np.ndarray] = {}
        self.dropped: dict[str, list[str]] = {}
        # an attribute scored as one distribution over its values, to which the configured taxonomy
        # added values: the model puts a product of a new value on one of its own, so none is written
        added = {
            attr.name: sorted(set(allowed[attr.name].values) - set(attr.values))
            for attr in model_taxonomy
            if attr.name not in model_taxonomy.derived  # a group's members decide it (below)
            and (attr.kind == "multiclass" or attr.single_valued)
        }
        self.notes: list[str] = []  # what the configured taxonomy keeps out, for the run's log
        for attr in model_taxonomy:
            thresholds = calibration.thresholds(attr.name).astype(np.float64).copy()
            derived = model_taxonomy.derived.get(attr.name)
            new = added.get(attr.name if derived is None else derived.parent)
            if new:
                gone = list(attr.values)
                if derived is None:
                    self.notes.append(
                        f"{attr.name} (its value groups too): not written - the configured taxonomy adds "
                        f"{_some(new)}, which the model does not score; train a version on them"
                    )
            else:
                allowed_values = set(allowed[attr.name].values)
                gone = [v for v in attr.values if v not in allowed_values]
                if derived is not None:  # a group is its members: moved ones are others
                    mine = model_taxonomy.members(attr.name)
                    theirs = allowed.members(attr.name) if attr.name in allowed.derived else {}
                    gone += [v for v in attr.values if v not in gone and mine[v] != theirs.get(v)]
                if gone:
                    note = (
                        f"{attr.name}: {_some(gone)} not written - the configured taxonomy no longer has "
                        "them, or changed their group"
                    )
                    # the attribute scope proved what all its values write together: what the rest
                    # write alone must prove the target again on the same calibration evidence
                    rest = [v for v in attr.values if v not in gone]
                    proof = calibration.kept_bound(attr.name, rest)
                    if proof is not None and proof < self.target_precision:
                        note = (
                            f"{attr.name}: not written - without {_some(gone)} the values left prove only a "
                            f"lower bound of {proof:.3f} < {self.target_precision:g} on the calibration "
                            "evidence; train a version on the configured taxonomy"
                        )
                        gone = list(attr.values)
                    self.notes.append(note)
            for v in gone:
                thresholds[attr.index(v)] = np.nan
            self.thresholds[attr.name] = thresholds
            self.dropped[attr.name] = gone
        # every attribute's values one after the other, as decide_flat indexes them
        self.all_values: list[str] = [v for attr in model_taxonomy for v in attr.values]
        self._value_attribute = np.repeat(
            np.arange(len(model_taxonomy.names)), [len(attr.values) for attr in model_taxonomy]
        ).astype(np.int64)
        self._all_thresholds = np.concatenate(
            [np.zeros(0)] + [self.thresholds[attr.name] for attr in model_taxonomy]
        )
        self._columns = {
            f"{attr.name}={value}": i
            for i, (attr, value) in enumerate((a, v) for a in model_taxonomy for v in a.values)
        }
        names = model_taxonomy.names
        # (derived attribute, its parent, the parent value -> group map) by position in the taxonomy
        self._levels = [
            (names.index(d.name), names.index(d.parent), np.asarray(d.group, np.int64))
            for d in model_taxonomy.derived.values()
        ]
        # the configured taxonomy's attributes whose merchant value settles each of the model's:
        # itself, and its groupings or their parent (Taxonomy.held_together), the model's or not
        # (a model trained before the catalog grouped its colours still leaves a merchant's family be)
        links = allowed.held_together()
        self.merchant_names = sorted({m for n in names for m in (n, *links.get(n, ()))})
        self._held_by = np.array(
            [[m == n or m in links.get(n, ()) for n in names] for m in self.merchant_names], np.uint8
        ).reshape(len(self.merchant_names), len(names))

    def filled(
        self, merchant: pa.Array | pa.ChunkedArray | Sequence[MerchantAttributes | AbstractSet[str]]
    ) -> np.ndarray:
        """``(n, attributes)`` bool: which of the model's attributes a merchant's value settles for
        each product (``merchant``: as :func:`merchant_filled` reads it)."""
        return (merchant_filled(merchant, self.merchant_names).astype(np.uint8) @ self._held_by) > 0

    def settled(self, filled: np.ndarray) -> np.ndarray:
        """``(n, attributes)`` bool: the attributes a merchant's values settle, given those they
        fill (:meth:`filled`). A merchant's value at any level stands for all: its shade implies its
        family, and no model shade is written under a family the merchant gave, nor a group of
        another grouping."""
        settled = np.array(filled, bool)
        for d, p, _ in self._levels:
            settled[:, p] |= filled[:, d]
        for d, p, _ in self._levels:
            settled[:, d] |= settled[:, p]
        return settled

    def inside_rejected(self, rejected: Iterable[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
        """The (product, attribute, value)s inside a group people rejected for the product (a shade
        of a rejected colour family): never written (:meth:`decide_flat`), and removed by the run as
        the rejected values themselves are."""
        derived = self.taxonomy.derived
        members = {d: self.taxonomy.members(d) for d in derived}
        return {
            (pid, derived[attr].parent, shade)
            for pid, attr, value in rejected
            if attr in derived
            for shade in members[attr].get(value, ())
        }

    def column_of(self, pair: str) -> int | None:
        """The position of ``"attribute=value"`` in :attr:`all_values` (None: the model has no such value)."""
        return self._columns.get(pair)

    @property
    def writable(self) -> dict[str, list[str]]:
        """Values that can be written at all (have a threshold and are allowed)."""
        return {
            a.name: [v for v, t in zip(a.values, self.thresholds[a.name], strict=True) if np.isfinite(t)]
            for a in self.taxonomy
        }

    def decide_flat(
        self,
        probs: Mapping[str, np.ndarray],
        filled: np.ndarray,
        skip: np.ndarray | None = None,
        rejected: np.ndarray | None = None,
    ) -> FlatDecisions:
        """The decisions of a batch as arrays.

        ``filled``: ``(n, n_attributes)`` bool, the attributes the merchant's values settle (taxonomy
        order, :meth:`filled`); ``skip`` marks products that are not decided at all (e.g. an
        unreadable image); ``rejected``: ``(n, len(all_values))`` bool, values people rejected for
        this model version, never written (the pair is still scored: its other values are decided
        as usual, and the run removes a rejected value the catalog still holds).
        """
        probs = self.taxonomy.derive(probs)  # the derived attributes' scores, unless given
        rejected = None if rejected is None else np.asarray(rejected, bool)
        n = filled.shape[0]
        skipped = np.zeros((n, 1), bool) if skip is None else np.asarray(skip, bool)[:, None]
        settled = self.settled(filled)
        blocked = settled | skipped
        written, scores = [], [np.zeros((n, 0))]
        for a, attr in enumerate(self.taxonomy):
            attr_scores = np.asarray(probs[attr.name], dtype=np.float64)
            written.append(
                decision_matrix(attr_scores, attr.kind, self.thresholds[attr.name]) & ~blocked[:, a, None]
            )
            scores.append(attr_scores)
        # never a value outside the group the model decides for the same product (whether or not
        # people rejected that group), nor inside a group people rejected for it
        names = self.taxonomy.names
        refused = (
            None
            if rejected is None
            else {names[d]: rejected[:, self._value_attribute == d] for d, _, _ in self._levels}
        )
        by_name = within_groups(dict(zip(names, written, strict=True)), self.taxonomy, refused)
        every = np.concatenate([np.zeros((n, 0), bool), *(by_name[name] for name in names)], axis=1)
        if rejected is not None:
            every &= ~rejected
        rows, cols = np.nonzero(every)  # row-major: by product, then attribute, then value
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(every.sum(axis=1), out=offsets[1:])
        return FlatDecisions(
            offsets,
            self._value_attribute[cols],
            cols,
            np.concatenate(scores, axis=1)[rows, cols],
            self._all_thresholds[cols],
            ~blocked,
            settled,
        )

    def decide(
        self, probs: Mapping[str, np.ndarray], merchant: Sequence[set[str]], skip: np.ndarray | None = None
    ) -> tuple[list[list[Decision]], list[list[str]]]:
        """Per product: the values to write and the attributes it was scored for (not merchant-filled).

        ``skip`` marks products that are not decided at all (e.g. an unreadable image).
        """
        names = self.taxonomy.names
        flat = self.decide_flat(probs, self.filled(merchant), skip)
        written = [
            Decision(names[a], self.all_values[v], c, t)
            for a, v, c, t in zip(
                flat.attribute.tolist(),
                flat.value.tolist(),
                flat.confidence.tolist(),
                flat.threshold.tolist(),
                strict=True,
            )
        ]
        bounds = flat.offsets.tolist()
        values = [written[start:stop] for start, stop in itertools.pairwise(bounds)]
        scored = [[names[a] for a in np.flatnonzero(row).tolist()] for row in flat.scored]
        return values, scored
