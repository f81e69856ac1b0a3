"""Data contracts: read ``schemas/*.yaml`` and derive Arrow schemas, Spark schemas and the taxonomy.

The YAML files are the single source of truth. Type strings use a small grammar::

    string | binary | boolean | int32 | int64 | float32 | float64 | date | timestamp
    list<T> | map<K, V>

``timestamp`` means UTC microseconds (Spark's ``TimestampType``, Arrow ``timestamp("us", "UTC")``).
pyspark is imported lazily, so the Arrow side works where no JVM is around.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from catalog_enrichment.errors import ContractError, TaxonomyError
from catalog_enrichment.yamlfile import read_yaml

if TYPE_CHECKING:
    from pyspark.sql.types import DataType, StructType

__all__ = [
    "CONTRACT_NAMES",
    "IMAGE_DECODABLE",
    "IMAGE_KEY",
    "IMAGE_READABLE",
    "IMAGE_SHARED",
    "IMAGE_URI_ALLOWED",
    "IMAGE_WITHIN_LIMITS",
    "SCORES_FINITE",
    "UNREADABLE",
    "AttributeSpec",
    "Contract",
    "DerivedAttribute",
    "FieldSpec",
    "Taxonomy",
    "arrow_type",
    "blank_value",
    "check_attribute_names",
    "image_key",
    "load_contract",
    "load_taxonomy",
    "merchant_key",
    "merchant_value_given",
    "mlflow_name",
    "schemas_dir",
    "spark_type",
]

# Quarantine reasons only the image decoder can find (the scoring pass reports them).
IMAGE_DECODABLE = "image_decodable"  # bytes present but not an image (corrupt, truncated, empty)
IMAGE_READABLE = "image_readable"  # image_uri given but the file cannot be read
IMAGE_URI_ALLOWED = "image_uri_allowed"  # image_uri outside the allowed roots and schemes (images.*)
# over images.max_bytes or images.max_pixels (a bomb), or a side under images.min_side (a tracking pixel)
IMAGE_WITHIN_LIMITS = "image_within_limits"
# The one quarantine reason about images decided before scoring: the same image on many products of
# a run (a CDN's placeholder, a "no image" tile), found by validation.rules.shared_image_rules.
IMAGE_SHARED = "image_shared"
# What names an image's bytes wherever they are read (inline by validation's Spark job, or behind
# image_uri by the scoring pass), so that a placeholder either one finds is known to the other.
IMAGE_KEY = "sha256:"
# A product the model scored NaN or infinite (a model or encoder fault): quarantined, not decided.
SCORES_FINITE = "scores_finite"
# A source whose values may not fit the contract's type (PostgreSQL jsonb for a map) reads the
# contract column plus UNREADABLE.format(column): the original text where it did not fit, else null.
UNREADABLE = "_{}_unreadable"


def blank_value(value: Any) -> bool:
    """Whether one attribute value (a merchant's, a label's) names nothing: null, or a text of
    whitespace (``[null]`` or ``[""]`` from an export)."""
    return value is None or not str(value).strip()


def mlflow_name(name: str) -> str:
    """``name`` (an attribute's, whatever the taxonomy calls it) as part of an MLflow metric, param
    or tag name: each run of the characters MLflow refuses (outside letters and digits of any
    script, ``_ . - :`` and the space; ``/`` too, which MLflow takes only inside a normalised
    path) becomes ``_``, so an attribute named ``size (EU)`` does not cost a run its whole MLflow
    record."""
    return re.sub(r"[^\w.\- :]+", "_", name)


def merchant_key(text: str) -> str:
    """A merchant's attribute name (or value) as it is matched to the taxonomy's: NFKC-normalised,
    stripped and casefolded, as the taxonomy's own name is (``"Color "`` is ``"color"``)."""
    return unicodedata.normalize("NFKC", text).strip().casefold()


def merchant_value_given(values: Any) -> bool:
    """Whether a merchant's entry for an attribute (``merchant_attributes``' list, or one text) holds
    a value that is not :func:`blank_value`."""
    if values is None or isinstance(values, str):
        return not blank_value(values)
    return any(not blank_value(v) for v in values)


def image_key(data: bytes) -> str:
    """The key of an image's bytes: ``sha256:<hex>``, as validation's ``F.sha2`` gives it too."""
    return IMAGE_KEY + hashlib.sha256(data).hexdigest()


CONTRACT_NAMES = ("products", "labelled_products", "attributes", "quarantine", "run_report")
AttributeKind = Literal["multilabel", "multiclass"]

_PRIMITIVES = ("string", "binary", "boolean", "int32", "int64", "float32", "float64", "date", "timestamp")


def schemas_dir() -> Path:
    """The contracts folder: ``_schemas`` inside an installed wheel, else ``schemas/`` of the checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_schemas", here.parent.parent / "schemas"):
        if (candidate / "products.yaml").is_file():
            return candidate
    raise ContractError(f"cannot find the schemas/ folder near {here}")


# ----------------------------------------------------------------------------- type grammar


def _split_top_level(inner: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(inner):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i].strip())
            start = i + 1
    parts.append(inner[start:].strip())
    return parts


def _parse(type_str: str) -> tuple[str, list[Any]]:
    text = type_str.strip()
    if text in _PRIMITIVES:
        return text, []
    match = re.fullmatch(r"(list|map)\s*<(.*)>", text)
    if not match:
        raise ContractError(f"unknown type {type_str!r}; expected one of {_PRIMITIVES}, list<T>, map<K, V>")
    kind, args = match.group(1), _split_top_level(match.group(2))
    if (kind == "list" and len(args) != 1) or (kind == "map" and len(args) != 2):
        raise ContractError(f"type {type_str!r} has the wrong number of type arguments")
    return kind, [_parse(arg) for arg in args]


def _to_arrow(node: tuple[str, list[Any]]) -> pa.DataType:
    kind, args = node
    simple: dict[str, pa.DataType] = {
        "string": pa.string(),
        "binary": pa.binary(),
        "boolean": pa.bool_(),
        "int32": pa.int32(),
        "int64": pa.int64(),
        "float32": pa.float32(),
        "float64": pa.float64(),
        "date": pa.date32(),
        "timestamp": pa.timestamp("us", tz="UTC"),
    }
    if kind in simple:
        return simple[kind]
    if kind == "list":
        return pa.list_(_to_arrow(args[0]))
    return pa.map_(_to_arrow(args[0]), _to_arrow(args[1]))


def _to_spark(node: tuple[str, list[Any]]) -> DataType:
    from pyspark.sql import types as T

    kind, args = node
    simple = {
        "string": T.StringType,
        "binary": T.BinaryType,
        "boolean": T.BooleanType,
        "int32": T.IntegerType,
        "int64": T.LongType,
        "float32": T.FloatType,
        "float64": T.DoubleType,
        "date": T.DateType,
        "timestamp": T.TimestampType,
    }
    if kind in simple:
        return simple[kind]()
    if kind == "list":
        return T.ArrayType(_to_spark(args[0]), containsNull=True)
    return T.MapType(_to_spark(args[0]), _to_spark(args[1]), valueContainsNull=True)


def arrow_type(type_str: str) -> pa.DataType:
    """Arrow type of a contract type string."""
    return _to_arrow(_parse(type_str))


def spark_type(type_str: str) -> DataType:
    """Spark type of a contract type string."""
    return _to_spark(_parse(type_str))


# ----------------------------------------------------------------------------- contracts


@dataclass(frozen=True)
class FieldSpec:
    """One column of a contract."""

    name: str
    type: str
    nullable: bool = True
    unique: bool = False
    allowed: tuple[str, ...] | None = None
    description: str = ""


@dataclass(frozen=True)
class Contract:
    """A table's contract: ordered fields plus partitioning and key."""

    name: str
    fields: tuple[FieldSpec, ...]
    partition_by: tuple[str, ...] = ()
    primary_key: tuple[str, ...] = ()
    description: str = ""

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def field(self, name: str) -> FieldSpec:
        for spec in self.fields:
            if spec.name == name:
                return spec
        raise ContractError(f"contract {self.name!r} has no column {name!r}")

    def arrow_schema(self, *, enforce_nullability: bool = True) -> pa.Schema:
        """The contract as a ``pyarrow.Schema`` (field order as in the YAML).

        ``enforce_nullability=False`` makes every column nullable: the schema of an *input* table
        as stored, which must be able to hold the bad rows that validation later quarantines.
        """
        return pa.schema(
            [
                pa.field(f.name, arrow_type(f.type), nullable=f.nullable or not enforce_nullability)
                for f in self.fields
            ]
        )

    def spark_schema(self, *, enforce_nullability: bool = True) -> StructType:
        """The contract as a Spark ``StructType`` (see :meth:`arrow_schema` for the flag)."""
        from pyspark.sql.types import StructField, StructType

        return StructType(
            [
                StructField(f.name, spark_type(f.type), f.nullable or not enforce_nullability)
                for f in self.fields
            ]
        )

    def missing_columns(self, present: Sequence[str]) -> list[str]:
        """Contract columns absent from ``present`` (extra columns in the data are allowed)."""
        have = set(present)
        return [name for name in self.names if name not in have]


def _field_from_yaml(raw: Mapping[str, Any], contract: str) -> FieldSpec:
    unknown = set(raw) - {"name", "type", "nullable", "unique", "allowed", "description"}
    if unknown or "name" not in raw or "type" not in raw:
        raise ContractError(f"contract {contract!r}: bad field entry {dict(raw)!r}")
    arrow_type(str(raw["type"]))  # fail early on a bad type string
    allowed = raw.get("allowed")
    return FieldSpec(
        name=str(raw["name"]),
        type=str(raw["type"]),
        nullable=bool(raw.get("nullable", True)),
        unique=bool(raw.get("unique", False)),
        allowed=tuple(str(v) for v in allowed) if allowed is not None else None,
        description=str(raw.get("description", "")),
    )


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


@cache
def _load_raw(path: Path) -> dict[str, Any]:
    data = read_yaml(path, "contract file", ContractError)
    if not isinstance(data, dict) or "fields" not in data:
        raise ContractError(f"{path} is not a contract file (needs a 'fields' list)")
    return data


def load_contract(
    name: str,
    *,
    taxonomy: Taxonomy | None = None,
    directory: Path | None = None,
) -> Contract:
    """Load ``schemas/<name>.yaml``.

    ``labelled_products`` extends ``products`` with one label column per taxonomy attribute and so
    needs ``taxonomy``.
    """
    folder = directory or schemas_dir()
    raw = _load_raw(folder / f"{name}.yaml")
    fields: list[FieldSpec] = []
    if "extends" in raw:
        fields.extend(load_contract(str(raw["extends"]), directory=folder).fields)
    fields.extend(_field_from_yaml(item, name) for item in raw.get("fields") or [])
    labels = raw.get("label_columns")
    if labels and labels.get("from_taxonomy"):
        if taxonomy is None:
            raise ContractError(f"contract {name!r} derives label columns from a taxonomy; pass taxonomy=")
        for attr in taxonomy.attributes.values():
            kind_type = labels["multilabel_type"] if attr.kind == "multilabel" else labels["multiclass_type"]
            fields.append(FieldSpec(attr.name, str(kind_type), bool(labels.get("nullable", True))))
    names = [f.name for f in fields]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ContractError(f"contract {name!r} defines columns more than once: {dupes}")
    return Contract(
        name=str(raw.get("name", name)),
        fields=tuple(fields),
        partition_by=_as_tuple(raw.get("partition_by")),
        primary_key=_as_tuple(raw.get("primary_key")),
        description=str(raw.get("description", "")),
    )


# ----------------------------------------------------------------------------- taxonomy


# names the job keeps for itself: the scope of the run health's input checks, the columns labels
# stage the attributes a merchant labelled and the reviewed products in
RESERVED_NAMES = ("input", "_merchant", "_reviewed")


def check_attribute_names(taxonomy: Taxonomy) -> None:
    """An attribute (or value group) is a column of the labelled table beside the products' own and
    the verdicts' (``confirmed``, ``rejected``): one named like those would overwrite it (a
    merchant's ``category`` replaced by its label, which the model reads as an input); nor may it
    take a name the job keeps for itself (:data:`RESERVED_NAMES`: one named ``input`` would be read
    as the run health's input checks). Checked where labels are built and training starts; a model
    already trained keeps loading.

    Raises:
        TaxonomyError: an attribute named like such a column, or a reserved name.
    """
    taken = {*load_contract("products").names, "confirmed", "rejected"}
    clashes = sorted(set(taxonomy.outputs.names) & (taken | set(RESERVED_NAMES)))
    if clashes:
        raise TaxonomyError(
            f"taxonomy {taxonomy.source}: attribute(s) {clashes} named like a column of the labelled "
            f"products table ({', '.join(sorted(taken))}) or a name the job keeps for itself "
            f"({', '.join(RESERVED_NAMES)}); rename them (e.g. product_category)"
        )


@dataclass(frozen=True)
class AttributeSpec:
    """One taxonomy attribute: its kind and its allowed values (order = head output order).

    ``single_valued``: a multi-label attribute the model scores as one distribution over its values
    (training sets it where every labelled product has one value; the model's own taxonomy keeps
    it): its groups' scores are sums, and each product keeps the score of its first-ranked value
    only, so no product clears two thresholds."""

    name: str
    kind: AttributeKind
    values: tuple[str, ...]
    extras: Mapping[str, Any] = field(default_factory=dict)
    single_valued: bool = False

    def index(self, value: str) -> int:
        try:
            return self.values.index(value)
        except ValueError:
            raise TaxonomyError(
                f"value {value!r} is not allowed for attribute {self.name!r} (allowed: {list(self.values)})"
            ) from None


@dataclass(frozen=True)
class DerivedAttribute:
    """An attribute whose values are groups of another's (a colour family of shades, a product group
    of product types): no head of its own, its scores the sum of its members' (:meth:`Taxonomy.derive`)
    and its labels its members' group. ``spec`` is the attribute as every consumer of attributes sees
    it (the parent's kind, the groups as values); ``group[v]`` is the group index of the parent's value
    ``v``, or ``-1`` for a value in no group."""

    spec: AttributeSpec
    parent: str
    group: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    def groups_of(self, values: Iterable[str], parent: AttributeSpec) -> set[str]:
        """The groups of some of the parent's values (a value in no group adds none)."""
        return {self.spec.values[g] for g in (self.group[parent.index(v)] for v in values) if g >= 0}

    def labels(self, parent: Any) -> Any:
        """The derived labels of the parent's: multi-class ``(n,)`` indices (``-1`` unlabelled) give
        each product its value's group, or ``len(spec.values)`` - labelled, in no group - where its
        value is in none; multi-label ``(n, V)`` multi-hot gives every group with a value set."""
        import numpy as np

        parent = np.asarray(parent)
        group = np.asarray(self.group, np.int64)
        if self.spec.kind == "multiclass":
            none = len(self.spec.values)
            mapped = np.where(group >= 0, group, none)
            return np.where(parent >= 0, mapped[np.clip(parent, 0, None)], -1).astype(parent.dtype)
        hot = np.zeros((parent.shape[0], len(self.spec.values)), parent.dtype)
        for g in range(len(self.spec.values)):
            hot[:, g] = parent[:, group == g].max(axis=1, initial=0)
        return hot


@dataclass(frozen=True)
class Taxonomy:
    """Attribute name -> :class:`AttributeSpec`, in file order: the attributes the model has heads for.
    ``derived``: the attributes defined by groups of their values (``groups:`` in the file), which the
    decision, calibration and every report treat like the others (:attr:`outputs`)."""

    attributes: Mapping[str, AttributeSpec]
    source: str = ""
    derived: Mapping[str, DerivedAttribute] = field(default_factory=dict)

    @property
    def outputs(self) -> Taxonomy:
        """Every attribute a value is written for: the learned ones, then the derived ones."""
        if not self.derived:
            return self
        every = {**self.attributes, **{d.name: d.spec for d in self.derived.values()}}
        return Taxonomy(every, self.source, self.derived)

    @property
    def learned(self) -> Taxonomy:
        """Only the attributes the model has heads for (what :attr:`outputs` adds removed)."""
        names = [n for n in self.attributes if n not in self.derived]
        return Taxonomy({n: self.attributes[n] for n in names}, self.source, self.derived)

    def derive(self, probs: Mapping[str, Any]) -> dict[str, Any]:
        """``probs`` (attribute -> ``(n, V)`` scores) with every derived attribute's scores added: a
        group's score is the sum of its values' for a multi-class or single-valued attribute (the
        probability that the value is in the group) and the highest of them for a multi-label one.
        A single-valued attribute's scores (and its groups') are then kept for each product's
        first-ranked value only."""
        import numpy as np

        out = dict(probs)
        for d in self.derived.values():
            if d.name in out or d.parent not in out:
                continue
            parent = np.asarray(out[d.parent])
            group = np.asarray(d.group)
            sums = d.spec.kind == "multiclass" or d.spec.single_valued
            cols = []
            for g in range(len(d.spec.values)):
                members = parent[:, group == g]
                cols.append(members.sum(axis=1) if sums else members.max(axis=1))
            out[d.name] = np.stack(cols, axis=1).astype(parent.dtype) if cols else parent[:, :0]
        for name, spec in self.outputs.attributes.items():
            if spec.single_valued and name in out:
                out[name] = _first_ranked(np.asarray(out[name]))
        return out

    def with_single_valued(self, names: Iterable[str]) -> Taxonomy:
        """This taxonomy with exactly ``names`` (multi-label attributes the model scores as one
        distribution) single-valued, their derived attributes too."""
        import dataclasses

        chosen = set(names)
        attrs = {
            n: dataclasses.replace(a, single_valued=n in chosen and a.kind == "multilabel")
            for n, a in self.attributes.items()
        }
        derived = {
            n: dataclasses.replace(
                d, spec=dataclasses.replace(d.spec, single_valued=attrs[d.parent].single_valued)
            )
            for n, d in self.derived.items()
        }
        return Taxonomy(attrs, self.source, derived)

    def held_together(self) -> dict[str, list[str]]:
        """Attribute -> the others a merchant's value of which holds it too: an attribute and its
        groupings (a colour and its colour family), each of them the others - a merchant's shade
        implies its family, and no model shade is written under a family the merchant gave, nor
        a group of another grouping of the same shades."""
        levels: dict[str, list[str]] = {}
        for d in self.derived.values():
            levels.setdefault(d.parent, [d.parent]).append(d.name)
        return {a: [b for b in group if b != a] for group in levels.values() for a in group}

    def members(self, derived: str) -> dict[str, frozenset[str]]:
        """Each group of the derived attribute ``derived`` and its parent's values in it."""
        d = self.derived[derived]
        parent = self[d.parent]
        return {
            g: frozenset(v for v, k in zip(parent.values, d.group, strict=True) if k == i)
            for i, g in enumerate(d.spec.values)
        }

    def __getitem__(self, name: str) -> AttributeSpec:
        try:
            return self.attributes[name]
        except KeyError:
            raise TaxonomyError(
                f"unknown attribute {name!r}; the taxonomy has {list(self.attributes)}"
            ) from None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.attributes.values())

    def __len__(self) -> int:
        return len(self.attributes)

    @property
    def names(self) -> list[str]:
        return list(self.attributes)

    def to_dict(self) -> dict[str, Any]:
        """Serialisable form (the file format, without extras)."""
        out: dict[str, Any] = {
            a.name: {"kind": a.kind, "values": list(a.values)}
            | ({"single_valued": True} if a.single_valued else {})
            for a in self.learned.attributes.values()
        }
        for d in self.derived.values():
            parent = self.attributes[d.parent]
            groups = {
                g: [v for v, i in zip(parent.values, d.group, strict=True) if i == k]
                for k, g in enumerate(d.spec.values)
            }
            out[d.parent].setdefault("groups", {})[d.name] = groups
        return {"attributes": out}

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<dict>") -> Taxonomy:
        """Validate and build a taxonomy from the parsed file format."""
        if not isinstance(data, Mapping) or not isinstance(data.get("attributes"), Mapping):
            raise TaxonomyError(f"taxonomy {source}: needs a top-level 'attributes' mapping")
        if not data["attributes"]:
            raise TaxonomyError(f"taxonomy {source}: 'attributes' is empty")
        attrs: dict[str, AttributeSpec] = {}
        for name, spec in data["attributes"].items():
            where = f"taxonomy {source}: attribute {name!r}"
            if not isinstance(spec, Mapping):
                raise TaxonomyError(f"{where} must be a mapping with kind and values")
            kind = spec.get("kind")
            if kind not in ("multilabel", "multiclass"):
                raise TaxonomyError(f"{where}: kind must be 'multilabel' or 'multiclass', got {kind!r}")
            values = spec.get("values")
            if not isinstance(values, Sequence) or isinstance(values, str) or not values:
                raise TaxonomyError(f"{where}: 'values' must be a non-empty list")
            str_values = [str(v) for v in values]
            dupes = sorted({v for v in str_values if str_values.count(v) > 1})
            if dupes:
                raise TaxonomyError(f"{where}: duplicate values {dupes}")
            if kind == "multiclass" and len(str_values) < 2:
                raise TaxonomyError(f"{where}: a multiclass attribute needs at least two values")
            single = spec.get("single_valued", False)
            if not isinstance(single, bool) or (single and kind != "multilabel"):
                raise TaxonomyError(
                    f"{where}: single_valued must be true or false, and only on a multilabel one"
                )
            extras = {k: v for k, v in spec.items() if k not in ("kind", "values", "groups", "single_valued")}
            attrs[str(name)] = AttributeSpec(str(name), kind, tuple(str_values), extras, single)
        derived: dict[str, DerivedAttribute] = {}
        for name, spec in data["attributes"].items():
            for d in _groupings(attrs[str(name)], spec.get("groups"), source):
                if d.name in attrs or d.name in derived:
                    raise TaxonomyError(f"taxonomy {source}: attribute {d.name!r} is defined twice")
                derived[d.name] = d
        return cls(attributes=attrs, source=source, derived=derived)


def _groupings(parent: AttributeSpec, groups: Any, source: str) -> list[DerivedAttribute]:
    """The derived attributes of ``parent``'s ``groups:`` (derived name -> group -> its values)."""
    if groups is None:
        return []
    where = f"taxonomy {source}: attribute {parent.name!r}"
    if not isinstance(groups, Mapping) or not groups:
        raise TaxonomyError(f"{where}: 'groups' must map a derived attribute's name to its groups")
    out = []
    for derived, members in groups.items():
        here = f"{where}: groups {derived!r}"
        if not isinstance(members, Mapping) or not members:
            raise TaxonomyError(f"{here} must map each group to a list of {parent.name}'s values")
        group = [-1] * len(parent.values)
        names = [str(g) for g in members]
        for k, (name, values) in enumerate(zip(names, members.values(), strict=True)):
            if not isinstance(values, Sequence) or isinstance(values, str) or not values:
                raise TaxonomyError(f"{here}: group {name!r} must be a non-empty list of values")
            for value in map(str, values):
                if value not in parent.values:
                    raise TaxonomyError(
                        f"{here}: group {name!r} names {value!r}, not a value of {parent.name!r}"
                    )
                v = parent.values.index(value)
                if group[v] >= 0:
                    raise TaxonomyError(
                        f"{here}: {value!r} is in two groups, {names[group[v]]!r} and {name!r}"
                    )
                group[v] = k
        spec = AttributeSpec(
            str(derived), parent.kind, tuple(names), {"derived_from": parent.name}, parent.single_valued
        )
        out.append(DerivedAttribute(spec, parent.name, tuple(group)))
    return out


def _first_ranked(scores: Any) -> Any:
    """``(n, V)`` scores with all but each row's highest set to 0 (a row with a NaN kept as it is)."""
    import numpy as np

    if scores.shape[1] == 0:
        return scores
    out = np.zeros_like(scores)
    rows, top = np.arange(scores.shape[0]), scores.argmax(axis=1)
    out[rows, top] = scores[rows, top]
    return np.where(np.isnan(scores).any(axis=1, keepdims=True), scores, out)


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Read a taxonomy YAML (default: the packaged ``schemas/taxonomy.yaml``)."""
    file = Path(path) if path is not None else schemas_dir() / "taxonomy.yaml"
    return Taxonomy.from_dict(read_yaml(file, "taxonomy file", TaxonomyError), source=str(file))
