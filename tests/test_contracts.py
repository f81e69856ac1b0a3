"""Contracts: the YAML is the truth; the Arrow and Spark schemas derived from it agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from catalog_enrichment.contracts import (
    CONTRACT_NAMES,
    Taxonomy,
    arrow_type,
    check_attribute_names,
    load_contract,
    load_taxonomy,
    schemas_dir,
)
from catalog_enrichment.errors import ContractError, TaxonomyError

_ARROW_OF = {
    "string": pa.string(),
    "binary": pa.binary(),
    "boolean": pa.bool_(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "list<string>": pa.list_(pa.string()),
    "map<string, list<string>>": pa.map_(pa.string(), pa.list_(pa.string())),
    "map<string, int64>": pa.map_(pa.string(), pa.int64()),
    "map<string, float64>": pa.map_(pa.string(), pa.float64()),
}


def _yaml_fields(name: str, taxonomy: Taxonomy) -> list[tuple[str, str, bool]]:
    raw = yaml.safe_load((schemas_dir() / f"{name}.yaml").read_text())
    fields = []
    if "extends" in raw:
        fields += _yaml_fields(raw["extends"], taxonomy)
    fields += [(f["name"], f["type"], f.get("nullable", True)) for f in raw["fields"]]
    if raw.get("label_columns"):
        fields += [(a.name, "list<string>" if a.kind == "multilabel" else "string", True) for a in taxonomy]
    return fields


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_arrow_and_spark_schemas_agree_with_the_yaml(name: str, taxonomy: Taxonomy) -> None:
    from pyspark.sql.pandas.types import to_arrow_schema

    contract = load_contract(name, taxonomy=taxonomy)
    expected = _yaml_fields(name, taxonomy)
    arrow = contract.arrow_schema()
    spark = contract.spark_schema()
    assert [(f.name, f.type, f.nullable) for f in arrow] == [(n, _ARROW_OF[t], nl) for n, t, nl in expected]
    assert [(f.name, f.nullable) for f in spark.fields] == [(n, nl) for n, _, nl in expected]
    # Spark's own Arrow conversion of our Spark schema must give our Arrow schema, type for type.
    spark_as_arrow = to_arrow_schema(spark, timezone="UTC")
    assert [(f.name, f.type) for f in spark_as_arrow] == [(f.name, f.type) for f in arrow]


def test_products_contract_has_the_design_fields(taxonomy: Taxonomy) -> None:
    products = load_contract("products")
    assert products.names == [
        "product_id",
        "title",
        "description",
        "image",
        "image_uri",
        "category",
        "merchant_attributes",
        "updated_at",
        "ingest_date",
    ]
    assert products.field("product_id").unique and not products.field("product_id").nullable
    assert products.partition_by == ("ingest_date",)
    labelled = load_contract("labelled_products", taxonomy=taxonomy)
    assert labelled.names[-4:] == ["color", "material", "product_type", "pattern"]
    assert load_contract("attributes").field("source").allowed == ("model", "merchant")


def test_stored_input_schema_relaxes_nullability() -> None:
    relaxed = load_contract("products").arrow_schema(enforce_nullability=False)
    assert all(f.nullable for f in relaxed)


def test_missing_columns_reports_what_is_absent() -> None:
    assert load_contract("products").missing_columns(["product_id", "title"])[:2] == ["description", "image"]


def test_labelled_contract_needs_a_taxonomy() -> None:
    with pytest.raises(ContractError, match="pass taxonomy"):
        load_contract("labelled_products")


@pytest.mark.parametrize("bad", ["str", "list<>", "map<string>", "list<string, int64>", "array<string>"])
def test_bad_type_strings_are_rejected(bad: str) -> None:
    with pytest.raises(ContractError):
        arrow_type(bad)


def test_default_taxonomy_matches_the_issue(taxonomy: Taxonomy) -> None:
    kinds = {a.name: (a.kind, len(a.values)) for a in taxonomy}
    assert kinds == {
        "color": ("multilabel", 12),
        "material": ("multilabel", 10),
        "product_type": ("multiclass", 15),
        "pattern": ("multiclass", 6),
    }
    assert taxonomy["color"].index("blue") == 4
    assert "synonyms" in taxonomy["color"].extras  # extra keys are kept, not rejected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "top-level 'attributes'"),
        ({"attributes": {}}, "is empty"),
        ({"attributes": {"color": {"kind": "multi", "values": ["a"]}}}, "kind must be"),
        ({"attributes": {"color": {"kind": "multilabel", "values": []}}}, "non-empty list"),
        ({"attributes": {"color": {"kind": "multilabel", "values": "red"}}}, "non-empty list"),
        ({"attributes": {"color": {"kind": "multilabel", "values": ["a", "a"]}}}, "duplicate values"),
        ({"attributes": {"size": {"kind": "multiclass", "values": ["xl"]}}}, "at least two values"),
    ],
)
def test_malformed_taxonomies_name_the_problem(data: dict, message: str) -> None:
    with pytest.raises(TaxonomyError, match=message):
        Taxonomy.from_dict(data)


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"category": {"kind": "multiclass", "values": ["a", "b"]}}, r"\['category'\] named like a column"),
        ({"confirmed": {"kind": "multiclass", "values": ["a", "b"]}}, r"\['confirmed'\] named like"),
        (
            {"color": {"kind": "multiclass", "values": ["a", "b"], "groups": {"title": {"x": ["a"]}}}},
            r"\['title'\] named like",
        ),
        # the run health's input checks: an attribute of that name would be judged as them
        (
            {"input": {"kind": "multiclass", "values": ["a", "b"]}},
            r"\['input'\] named like .* keeps for itself",
        ),
        ({"_merchant": {"kind": "multilabel", "values": ["a", "b"]}}, r"\['_merchant'\] named like"),
        ({"_reviewed": {"kind": "multilabel", "values": ["a", "b"]}}, r"\['_reviewed'\] named like"),
    ],
)
def test_an_attribute_named_like_a_labelled_table_column_is_refused_for_labels_and_training(
    attributes: dict, message: str
) -> None:
    """A label named like an input column would overwrite it (a merchant's category replaced by its
    label, read by the model as an input): labels and training refuse it; a model already trained
    with one still loads."""
    taxonomy = Taxonomy.from_dict({"attributes": attributes})
    with pytest.raises(TaxonomyError, match=message):
        check_attribute_names(taxonomy)


def test_unknown_attribute_and_value_are_clear_errors(taxonomy: Taxonomy) -> None:
    with pytest.raises(TaxonomyError, match="unknown attribute 'size'"):
        taxonomy["size"]
    with pytest.raises(TaxonomyError, match="'teal' is not allowed for attribute 'color'"):
        taxonomy["color"].index("teal")


def test_user_taxonomy_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "tax.yaml"
    path.write_text("attributes:\n  size: {kind: multiclass, values: [s, m, l], description: fit}\n")
    tax = load_taxonomy(path)
    assert Taxonomy.from_dict(tax.to_dict()).to_dict() == tax.to_dict()
    with pytest.raises(TaxonomyError, match="not found"):
        load_taxonomy(tmp_path / "missing.yaml")


def test_value_groups_define_derived_attributes_and_bad_groups_are_one_line_errors() -> None:
    """hierarchy.yaml's shape under an attribute's ``groups``: a derived attribute whose labels
    follow from the parent's (a value in no group: labelled, in none) and round-trip through the
    file format; a group naming an unknown value, a value in two groups: a clear error each."""
    import numpy as np

    spec = {
        "kind": "multiclass",
        "values": ["Blue", "Dark Blue", "Red", "Other"],
        "groups": {"color_family": {"Blue": ["Blue", "Dark Blue"], "Red": ["Red"]}},
    }
    taxonomy = Taxonomy.from_dict({"attributes": {"color": spec}})
    assert taxonomy.names == ["color"] and taxonomy.outputs.names == ["color", "color_family"]
    family = taxonomy.derived["color_family"]
    assert family.spec.kind == "multiclass" and family.spec.values == ("Blue", "Red")
    assert family.labels(np.array([0, 1, 2, 3, -1])).tolist() == [0, 0, 1, 2, -1]
    assert Taxonomy.from_dict(taxonomy.to_dict()) == taxonomy
    for groups, message in [
        ({"Blue": ["Navy"]}, "group 'Blue' names 'Navy', not a value of 'color'"),
        ({"Blue": ["Blue"], "Dark": ["Blue"]}, "'Blue' is in two groups, 'Blue' and 'Dark'"),
        ({"Blue": []}, "group 'Blue' must be a non-empty list of values"),
    ]:
        with pytest.raises(TaxonomyError, match=re.escape(message)):
            Taxonomy.from_dict({"attributes": {"color": {**spec, "groups": {"color_family": groups}}}})
    with pytest.raises(TaxonomyError, match="'color' is defined twice"):
        Taxonomy.from_dict({"attributes": {"color": {**spec, "groups": {"color": {"Blue": ["Blue"]}}}}})


def test_a_single_valued_attribute_sums_its_groups_and_keeps_its_first_ranked_value() -> None:
    """A multi-label attribute the model scores as one distribution (training marks it): a group's
    score is the probability of its values together, and of the shades and of the families each
    product keeps its first-ranked one only, so no product clears two thresholds. Unmarked, the
    same attribute's groups take their highest value's score and every value keeps its own."""
    import numpy as np

    spec = {
        "kind": "multilabel",
        "values": ["Blue", "Dark Blue", "Red", "Other"],
        "groups": {"color_family": {"Blue": ["Blue", "Dark Blue"], "Red": ["Red"]}},
    }
    plain = Taxonomy.from_dict({"attributes": {"color": spec}})
    single = plain.with_single_valued(["color"])
    assert single["color"].single_valued and single.derived["color_family"].spec.single_valued
    probs = {"color": np.array([[0.3, 0.3, 0.4, 0.0], [0.1, 0.1, 0.1, 0.7]], np.float32)}
    derived = single.derive(probs)
    np.testing.assert_allclose(derived["color_family"], [[0.6, 0.0], [0.2, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(derived["color"], [[0.0, 0.0, 0.4, 0.0], [0.0, 0.0, 0.0, 0.7]])
    assert single.derive(derived)["color"].tolist() == derived["color"].tolist()  # again: the same
    unmarked = plain.derive(probs)
    np.testing.assert_allclose(unmarked["color_family"], [[0.3, 0.4], [0.1, 0.1]], rtol=1e-6)
    np.testing.assert_allclose(unmarked["color"], probs["color"])
    # the model's taxonomy keeps the mark; it is for multi-label attributes only
    assert Taxonomy.from_dict(single.to_dict()) == single
    with pytest.raises(TaxonomyError, match="single_valued must be true or false, and only on a multilabel"):
        Taxonomy.from_dict(
            {"attributes": {"size": {"kind": "multiclass", "values": ["s", "m"], "single_valued": True}}}
        )
