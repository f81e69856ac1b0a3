"""The decision policy on known scores: thresholds, kinds, merchant values, the taxonomy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from catalog_enrichment.calibration import (
    AttributeCalibration,
    Calibration,
    PooledEvidence,
    ValueThreshold,
    clopper_pearson_lower,
)
from catalog_enrichment.contracts import Taxonomy, merchant_key
from catalog_enrichment.errors import TaxonomyError
from catalog_enrichment.inference.decide import (
    DecisionPolicy,
    merchant_attributes,
    merchant_filled,
)

pytestmark = pytest.mark.timeout(60)


def calibrated_at(taxonomy: Taxonomy, value: float | dict[str, float]) -> Calibration:
    """Every value's threshold ``value`` (or its attribute's, from a dict)."""
    at = value if isinstance(value, dict) else dict.fromkeys(taxonomy.outputs.names, value)
    return Calibration(
        0.95,
        0.95,
        "wilson",
        20,
        {
            a.name: AttributeCalibration(
                a.name, a.kind, tuple(ValueThreshold(v, at[a.name], 100) for v in a.values)
            )
            for a in taxonomy.outputs
        },
    )


def policy_at(taxonomy: Taxonomy, allowed: Taxonomy | None = None, value: float = 0.5) -> DecisionPolicy:
    return DecisionPolicy(taxonomy, calibrated_at(taxonomy, value), allowed or taxonomy)


def test_decisions_follow_thresholds_kinds_merchant_values_and_taxonomy(taxonomy: Taxonomy) -> None:
    color, ptype = taxonomy["color"], taxonomy["product_type"]
    assert color.kind == "multilabel" and ptype.kind == "multiclass"
    probs = {a.name: np.zeros((3, len(a.values))) for a in taxonomy}
    probs["color"][0, [0, 1]] = [0.9, 0.6]  # two colours clear -> both written
    probs["color"][1, 2] = 0.4  # below the threshold -> nothing
    probs["product_type"][0, [0, 1]] = [0.7, 0.6]  # multi-class: only the top-1
    probs["product_type"][2, 3] = 0.9  # merchant filled product_type for product 2 -> skipped
    values, scored = policy_at(taxonomy).decide(probs, [set(), set(), {"product_type"}])
    assert [(d.attribute, d.value) for d in values[0]] == [
        ("color", color.values[0]),
        ("color", color.values[1]),
        ("product_type", ptype.values[0]),
        ("color_family", "neutral"),  # black and white: derived from the colours' scores
    ]
    assert values[1] == [] and values[2] == []
    assert "product_type" not in scored[2] and set(scored[0]) == set(taxonomy.outputs.names)
    # skip = not decided at all (e.g. undecodable image)
    values, scored = policy_at(taxonomy).decide(probs, [set()] * 3, skip=np.array([True, False, False]))
    assert values[0] == [] and scored[0] == []
    # a value the catalog's taxonomy no longer allows is never written
    data = taxonomy.to_dict()
    data["attributes"]["color"]["values"] = [v for v in color.values if v != color.values[0]]
    family = data["attributes"]["color"]["groups"]["color_family"]
    family["neutral"] = [v for v in family["neutral"] if v != color.values[0]]
    values, _ = policy_at(taxonomy, Taxonomy.from_dict(data)).decide(probs, [set()] * 3)
    assert [(d.attribute, d.value) for d in values[0] if d.attribute == "color"] == [
        ("color", color.values[1])
    ]


def test_a_model_attribute_missing_from_the_configured_taxonomy_is_an_error(taxonomy: Taxonomy) -> None:
    data = taxonomy.to_dict()
    del data["attributes"]["pattern"]
    with pytest.raises(TaxonomyError, match="'pattern' is not in the configured taxonomy"):
        policy_at(taxonomy, Taxonomy.from_dict(data))


PATTERNS = Taxonomy.from_dict(
    {"attributes": {"pattern": {"kind": "multiclass", "values": ["Solid", "Striped", "Dotted"]}}}
)


def _pooled_patterns(scope: str) -> Calibration:
    """Solid wrote 500 calibration values, all right; Striped 100, 80 right; Dotted has no threshold.
    Together 580 of 600 (96.7 %): Clopper-Pearson's 95 % lower bound 0.9519 proves 0.95."""
    values = (
        ValueThreshold("Solid", 0.5, 600, n_written=500, n_correct=500),
        ValueThreshold("Striped", 0.5, 120, n_written=100, n_correct=80),
        ValueThreshold("Dotted", None, 3, reason="never reaches the level in the family"),
    )
    pooled = PooledEvidence(0.95, 600, 580, 580 / 600, 0.9519, 3) if scope == "attribute" else None
    attribute = AttributeCalibration("pattern", "multiclass", values, pooled)
    return Calibration(0.95, 0.95, "clopper_pearson", 20, {"pattern": attribute}, scope)  # type: ignore[arg-type]


def _without(*values: str) -> Taxonomy:
    return Taxonomy.from_dict(
        {
            "attributes": {
                "pattern": {
                    "kind": "multiclass",
                    "values": [v for v in PATTERNS["pattern"].values if v not in values],
                }
            }
        }
    )


def test_dropping_values_writes_the_rest_only_if_their_own_evidence_proves_the_target() -> None:
    """The attribute scope proved Solid and Striped together; without Solid, Striped's 80 of 100
    prove nothing and it is not written. Without Striped, Solid's 500 of 500 prove the target; a value
    that had no threshold changes nothing. The value scope proved each value alone: dropping one
    keeps the other."""
    assert clopper_pearson_lower(580, 600) == pytest.approx(0.9519, abs=1e-4)
    probs = {"pattern": np.array([[0.1, 0.9, 0.0], [0.9, 0.1, 0.0]])}
    policy = DecisionPolicy(PATTERNS, _pooled_patterns("attribute"), _without("Solid"))
    assert policy.writable == {"pattern": []} and policy.dropped == {
        "pattern": ["Solid", "Striped", "Dotted"]
    }
    assert policy.notes == [
        "pattern: not written - without Solid the values left prove only a lower bound of 0.723 < 0.95 on "
        "the calibration evidence; train a version on the configured taxonomy"
    ]
    assert policy.decide(probs, [set()] * 2)[0] == [[], []]
    assert DecisionPolicy(PATTERNS, _pooled_patterns("attribute"), _without("Striped")).writable == {
        "pattern": ["Solid"]
    }
    assert DecisionPolicy(PATTERNS, _pooled_patterns("attribute"), _without("Dotted")).writable == {
        "pattern": ["Solid", "Striped"]
    }
    assert DecisionPolicy(PATTERNS, _pooled_patterns("value"), _without("Solid")).writable == {
        "pattern": ["Striped"]
    }


def test_merchant_attributes_from_arrow_maps_and_dicts() -> None:
    assert merchant_attributes(None) == set()
    assert merchant_attributes([("color", ["red"]), ("material", [])]) == {"color"}
    assert merchant_attributes({"pattern": ["solid"]}) == {"pattern"}


MERCHANT = pa.map_(pa.string(), pa.list_(pa.string()))


def test_merchant_filled_reads_arrow_maps_without_python_rows() -> None:
    names = ["color", "material", "pattern"]
    column = pa.array(
        [
            [("color", ["red"]), ("material", [])],  # an empty list is not filled
            None,  # no merchant attributes at all
            [("pattern", None), ("brand", ["acme"])],  # a null value is not filled; unknown keys ignored
            [("color", ["blue"]), ("pattern", ["solid"])],
        ],
        MERCHANT,
    )
    expected = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 1]], bool)
    np.testing.assert_array_equal(merchant_filled(column, names), expected)
    # a slice reads its own rows (Arrow keeps the parent's offsets and children)
    np.testing.assert_array_equal(merchant_filled(column.slice(2), names), expected[2:])
    np.testing.assert_array_equal(merchant_filled(pa.chunked_array([column]), names), expected)
    # the same pairs as list<struct<key, value>>, and as Python values, give the same answer
    pairs = column.cast(pa.list_(pa.struct([("key", pa.string()), ("value", pa.list_(pa.string()))])))
    np.testing.assert_array_equal(merchant_filled(pairs, names), expected)
    np.testing.assert_array_equal(merchant_filled(column.to_pylist(), names), expected)
    np.testing.assert_array_equal(
        merchant_filled([{"color"}, set(), set(), {"color", "pattern"}], names), expected
    )
    # an entry holding only nulls or blanks (an export's empty attribute) is no value: the
    # model's value there is not removed as a merchant's would replace it
    empty = pa.array(
        [[("color", [None]), ("pattern", ["  "])], [("color", [None, "red"]), ("pattern", ["", "\t"])]],
        MERCHANT,
    )
    expected = np.array([[0, 0, 0], [1, 0, 0]], bool)
    np.testing.assert_array_equal(merchant_filled(empty, names), expected)
    np.testing.assert_array_equal(merchant_filled(empty.slice(1), names), expected[1:])
    np.testing.assert_array_equal(merchant_filled(empty.to_pylist(), names), expected)
    assert merchant_attributes({"color": "  ", "pattern": "solid"}) == {"pattern"}
    # a column Arrow typed as all-null (no merchant filled anything), and no rows at all
    np.testing.assert_array_equal(merchant_filled(pa.nulls(3), names), np.zeros((3, 3), bool))
    assert merchant_filled(column.slice(0, 0), names).shape == (0, 3)


SHADES = Taxonomy.from_dict(
    {
        "attributes": {
            "color": {
                "kind": "multiclass",
                "values": ["Blue", "Dark Blue", "Light Blue", "Red", "Other"],
                "groups": {"color_family": {"Blue": ["Blue", "Dark Blue", "Light Blue"], "Red": ["Red"]}},
            }
        }
    }
)


def test_a_family_certain_while_no_shade_is_gets_the_family_and_no_shade() -> None:
    """Every threshold 0.9: 0.5 + 0.45 of blues make a blue product (family written, no shade); a shade
    that clears is written with its family; a shade under another written family is not; a merchant's
    shade keeps the model's family out, and a merchant's family the model's shade."""
    policy = policy_at(SHADES, value=0.9)
    shades = np.array(
        [
            [0.50, 0.45, 0.00, 0.05, 0.00],  # blue, but which blue?
            [0.95, 0.02, 0.02, 0.01, 0.00],  # Blue, certainly
            [0.00, 0.00, 0.00, 0.08, 0.92],  # 'Other': in no family
            [0.95, 0.02, 0.02, 0.01, 0.00],  # the merchant gave a shade
            [0.95, 0.02, 0.02, 0.01, 0.00],  # the merchant gave a family
        ]
    )
    probs = SHADES.derive({"color": shades})
    assert probs["color_family"][0] == pytest.approx([0.95, 0.05])
    merchant = [set(), set(), set(), {"color"}, {"color_family"}]
    values, scored = policy.decide(probs, merchant)
    written = [[(d.attribute, d.value) for d in row] for row in values]
    assert written == [
        [("color_family", "Blue")],
        [("color", "Blue"), ("color_family", "Blue")],
        [("color", "Other")],
        [],
        [],
    ]
    assert scored[3] == scored[4] == []


def test_the_test_report_counts_what_the_job_writes_not_each_attribute_s_thresholds_alone() -> None:
    """Shades at 0.4, families at 0.5: Red (0.4) clears its threshold, but the blues (0.6) make the
    family Blue, so the job writes Blue and not Red; the test report and the health profile count
    the same one value, where each attribute's thresholds alone would count Red as well."""
    from catalog_enrichment.data.dataset import EncodedLabels
    from catalog_enrichment.training.evaluation import Predictions, evaluate, with_health

    calibration = calibrated_at(SHADES, {"color": 0.4, "color_family": 0.5})
    shades = np.array([[0.20, 0.20, 0.20, 0.40, 0.00]])
    values, _ = DecisionPolicy(SHADES, calibration, SHADES).decide(SHADES.derive({"color": shades}), [set()])
    assert [(d.attribute, d.value) for d in values[0]] == [("color_family", "Blue")]
    labels = EncodedLabels({"color": np.array([3])}, {"color": np.array([True])})  # it is Red
    report = evaluate(Predictions({"color": shades}, None, {}), labels, SHADES, calibration)
    assert report["color"]["written"] == 0 and report["color"]["coverage"] == 0.0
    assert report["color"]["per_value"]["Red"]["written"] == 0
    assert report["color_family"]["written"] == 1 and report["color_family"]["written_correct"] == 0
    health = with_health(calibration, Predictions({"color": shades}, None, {}), labels, SHADES, None).health
    assert health is not None and health.attributes["color"].covered == 0


def test_a_merchant_s_family_settles_a_model_without_families_and_every_other_grouping() -> None:
    """A model trained before the catalog grouped its colours (the configured taxonomy has the
    families, the model not) writes no shade where the merchant gave a family; and with two
    groupings of one parent, a merchant's value in one keeps the model's other out too."""
    plain = Taxonomy.from_dict(
        {"attributes": {"color": {"kind": "multiclass", "values": SHADES["color"].values}}}
    )
    blue = np.array([[0.95, 0.02, 0.02, 0.01, 0.00]] * 2)
    values, scored = policy_at(plain, SHADES, value=0.9).decide({"color": blue}, [set(), {"color_family"}])
    assert [[(d.attribute, d.value) for d in row] for row in values] == [[("color", "Blue")], []]
    assert scored == [["color"], []]
    data = SHADES.to_dict()
    data["attributes"]["color"]["groups"]["color_tone"] = {"Cool": ["Blue", "Dark Blue", "Light Blue"]}
    two = Taxonomy.from_dict(data)
    assert two.held_together()["color_family"] == ["color", "color_tone"]
    values, scored = policy_at(two, value=0.9).decide(two.derive({"color": blue}), [set(), {"color_family"}])
    assert [[(d.attribute, d.value) for d in row] for row in values] == [
        [("color", "Blue"), ("color_family", "Blue"), ("color_tone", "Cool")],
        [],
    ]
    assert scored[1] == []


def _shades_below_families() -> Calibration:
    """Every shade's threshold 0.3, every family's 0.6."""
    return Calibration(
        0.95,
        0.95,
        "wilson",
        20,
        {
            "color": AttributeCalibration(
                "color", "multiclass", tuple(ValueThreshold(v, 0.3, 100) for v in SHADES["color"].values)
            ),
            "color_family": AttributeCalibration(
                "color_family",
                "multiclass",
                (ValueThreshold("Blue", 0.6, 100), ValueThreshold("Red", 0.6, 100)),
            ),
        },
    )


def test_a_shade_outside_the_family_written_is_not_written() -> None:
    """A shade's threshold can sit below its family's: the family written wins over a shade of another."""
    policy = DecisionPolicy(SHADES, _shades_below_families(), SHADES)
    probs = SHADES.derive({"color": np.array([[0.30, 0.25, 0.05, 0.40, 0.00]])})  # Red top, blue family
    values, _ = policy.decide(probs, [set()])
    assert [(d.attribute, d.value) for d in values[0]] == [("color_family", "Blue")]


def test_a_group_whose_members_the_configured_taxonomy_changed_is_not_written() -> None:
    """The model's families were summed over its own members: where the catalog's taxonomy moves
    Light Blue out of Blue (into a new family Pale), Blue and Pale are not written (Red, the same
    members, is), and a Blue shade is no longer held inside a written Blue family."""
    data = SHADES.to_dict()
    data["attributes"]["color"]["groups"]["color_family"] = {
        "Blue": ["Blue", "Dark Blue"],
        "Red": ["Red"],
        "Pale": ["Light Blue"],
    }
    moved = Taxonomy.from_dict(data)
    policy = policy_at(SHADES, moved, value=0.9)
    assert policy.dropped["color_family"] == ["Blue"]
    assert policy.notes == [
        "color_family: Blue not written - the configured taxonomy no longer has them, or changed their group"
    ]
    assert np.isnan(policy.thresholds["color_family"]).tolist() == [True, False]
    probs = SHADES.derive(
        {
            "color": np.array(
                [[0.50, 0.45, 0.00, 0.05, 0.00], [0.95, 0.02, 0.02, 0.01, 0.00], [0, 0, 0, 1.0, 0]]
            )
        }
    )
    values, _ = policy.decide(probs, [set()] * 3)
    assert [[(d.attribute, d.value) for d in row] for row in values] == [
        [],
        [("color", "Blue")],
        [("color", "Red"), ("color_family", "Red")],
    ]


def test_values_the_configured_taxonomy_added_to_one_distribution_keep_the_attribute_out(
    taxonomy: Taxonomy,
) -> None:
    """The catalog's taxonomy adds Teal to the shades (a multi-class attribute: the model would put a
    teal product on Blue, its nearest value): no shade and no family is written until a retrain. A
    value added to an attribute of independent values (multi-label colour) leaves the others."""
    data = SHADES.to_dict()
    data["attributes"]["color"]["values"].append("Teal")
    data["attributes"]["color"]["groups"]["color_family"]["Blue"].append("Teal")
    policy = policy_at(SHADES, Taxonomy.from_dict(data), value=0.5)
    assert policy.dropped == {"color": list(SHADES["color"].values), "color_family": ["Blue", "Red"]}
    assert policy.notes == [
        "color (its value groups too): not written - the configured taxonomy adds Teal, which the model "
        "does not score; train a version on them"
    ]
    probs = SHADES.derive({"color": np.array([[0.95, 0.02, 0.02, 0.01, 0.00]])})  # a teal one: Blue
    values, _ = policy.decide(probs, [set()])
    assert values == [[]]

    color = taxonomy["color"]
    assert color.kind == "multilabel" and not color.single_valued
    data = taxonomy.to_dict()
    data["attributes"]["color"]["values"].append("teal")
    policy = policy_at(taxonomy, Taxonomy.from_dict(data))
    assert policy.dropped["color"] == [] and not any(policy.dropped.values())


def test_a_shade_inside_a_family_people_rejected_is_not_written() -> None:
    """Reviewers rejected the family Blue for the first product and the shade Blue for the second:
    the first gets neither the family nor a blue shade, the second the family and no shade. The
    third (Red 0.40 clears its shade threshold, 0.3; the blues make the family Blue, 0.6) gets no
    Red once Blue is rejected: a shade outside the family the model decides stays out."""
    policy = DecisionPolicy(SHADES, _shades_below_families(), SHADES)
    probs = SHADES.derive(
        {"color": np.array([[0.95, 0.02, 0.02, 0.01, 0.00]] * 2 + [[0.30, 0.25, 0.05, 0.40, 0.00]])}
    )
    rejected = np.zeros((3, len(policy.all_values)), bool)
    rejected[[0, 2], policy.column_of("color_family=Blue")] = True
    rejected[1, policy.column_of("color=Blue")] = True
    flat = policy.decide_flat(probs, np.zeros((3, 2), bool), rejected=rejected)
    assert flat.offsets.tolist() == [0, 0, 1, 1]
    assert [policy.all_values[v] for v in flat.value.tolist()] == ["Blue"]
    assert flat.attribute.tolist() == [SHADES.outputs.names.index("color_family")]


def test_the_shades_of_a_family_people_rejected_are_removed_with_it() -> None:
    """The run removes what people rejected and the shades of a rejected family (it would not write
    them again); a rejected shade, a family the model does not know and a value in no group add none."""
    policy = DecisionPolicy(SHADES, _shades_below_families(), SHADES)
    rejected = {("p1", "color_family", "Blue"), ("p2", "color", "Red"), ("p3", "color_family", "Green")}
    blues = {("p1", "color", v) for v in ("Blue", "Dark Blue", "Light Blue")}
    assert policy.inside_rejected(rejected) == blues
    assert policy.inside_rejected({("p4", "color_family", "Red")}) == {("p4", "color", "Red")}


def test_a_merchant_key_in_another_case_width_or_spacing_fills_the_taxonomy_s_attribute() -> None:
    """The keys "Color ", "COLOR" and a full-width "ｃｏｌｏｒ" are the taxonomy's colour, read from an
    Arrow map and from Python values alike; a key only close to a name ("colour") is none of it."""
    names = ["color", "material"]
    column = pa.array(
        [
            [("Color ", ["red"])],
            [("COLOR", ["red"]), (" Material", ["wool"])],
            [("ｃｏｌｏｒ", ["red"])],
            [("colour", ["red"])],
        ],
        MERCHANT,
    )
    expected = np.array([[1, 0], [1, 1], [1, 0], [0, 0]], bool)
    np.testing.assert_array_equal(merchant_filled(column, names), expected)
    np.testing.assert_array_equal(merchant_filled(column.slice(1), names), expected[1:])
    np.testing.assert_array_equal(merchant_filled(column.to_pylist(), names), expected)
    assert merchant_key(" Ｃｏｌｏｒ\t") == "color"


def test_a_product_not_decided_still_has_the_pairs_its_merchant_settles(taxonomy: Taxonomy) -> None:
    """A product quarantined for its image gets no value and no scored pair, but its merchant's
    colour settles colour and its family all the same: the catalog drops the model's values there."""
    policy = policy_at(taxonomy)
    probs = {a.name: np.full((2, len(a.values)), 0.9) for a in taxonomy}
    flat = policy.decide_flat(probs, policy.filled([{"color"}, {"color"}]), skip=np.array([True, False]))
    names = policy.taxonomy.names
    assert flat.offsets[1] == 0 and not flat.scored[0].any()
    settled = [[names[a] for a in np.flatnonzero(row)] for row in flat.settled]
    assert settled[0] == settled[1] == ["color", "color_family"]
