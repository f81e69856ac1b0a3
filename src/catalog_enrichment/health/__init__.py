"""Health of a run: does tonight's scoring still look like the products the thresholds were proven on?

The 95 % guarantee is proven on held-out products and holds for products that look like them. At
training, a :class:`HealthProfile` is kept in the bundle (``calibration.json: health``): per
attribute, the final model's scores on held-out products it never trained on (the test split, or
the validation split when the test products are a separate table) - the top score's deciles, the
share the thresholds give a value, the mix of top values and the precision of written values per
confidence bin - and, over every training product, the inputs: title lengths, title scripts,
merchant categories, descriptions and images present or unusable. Each scoring task counts the same
for the products it scores (:class:`HealthTally`, summed by a Spark accumulator in the scoring pass
itself: no second read), and the driver compares (:func:`assess`).

Every distribution (score deciles, coverage, value mix and the input checks) is compared with one
two-sample test: Pearson's chi-square test of homogeneity between the baseline's ``m`` products and
tonight's ``n``, with sparse bins pooled until each expects :data:`MIN_EXPECTED` products (so the
chi-square approximation holds): categories ranked by both sides' counts together, the baseline's
quantile bins in order; bins too rare to stand alone are also compared with the rest by Fisher's
exact test, so a night crowding into one is not pooled away. Estimated precision - what was
written, each value weighted by the held-out precision at its confidence (label-free, in the spirit
of NannyML's CBPE) - fails when even its upper confidence bound is below the target.

The levels are Bonferroni-split: with ``K`` checks evaluated in a run, each fails at
``false_alarm / K``, so a clean run - products drawn from the baseline's distribution - raises any
alarm at most ``false_alarm`` (1 %) of the time, at every batch size (``tests/test_health.py``
simulates it). Products that come in groups of variants (the same title and description: colours
and sizes of one article) count alike in every check, so a batch holds fewer independent products
than rows: each statistic is divided by the training products' design effect (Rao and Scott's
first-order correction for cluster samples). A significant difference must also be large enough to
matter (``min_psi``, ``min_share_change``), so a backfill of millions does not alarm on a negligible
shift. An attribute with fewer than ``min_products`` scored products is not judged, nor the
estimated precision of fewer than :data:`MIN_WRITTEN` values written.

``profile.py`` counts (the profile a version keeps, the tallies a run counts); ``checks.py`` judges.
"""

from __future__ import annotations

from catalog_enrichment.health.checks import (
    MIN_WRITTEN,
    Check,
    assess,
    blocked_attributes,
    format_health,
    homogeneity,
    plot_scores,
    psi,
)
from catalog_enrichment.health.profile import (
    ATTRIBUTE_CHECKS,
    CONFIDENCE_BINS,
    INPUT,
    INPUT_CHECKS,
    SCRIPTS,
    AttributeBaseline,
    HealthProfile,
    HealthTally,
    InputBaseline,
    InputBaselineCounts,
    ProductInputs,
    attribute_baseline,
    cluster_design_effect,
    input_baseline,
    share_design_effect,
    title_script,
)

__all__ = [
    "ATTRIBUTE_CHECKS",
    "CONFIDENCE_BINS",
    "INPUT",
    "INPUT_CHECKS",
    "MIN_WRITTEN",
    "SCRIPTS",
    "AttributeBaseline",
    "Check",
    "HealthProfile",
    "HealthTally",
    "InputBaseline",
    "InputBaselineCounts",
    "ProductInputs",
    "assess",
    "attribute_baseline",
    "blocked_attributes",
    "cluster_design_effect",
    "format_health",
    "homogeneity",
    "input_baseline",
    "plot_scores",
    "psi",
    "share_design_effect",
    "title_script",
]
