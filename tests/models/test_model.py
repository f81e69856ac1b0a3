"""The model's pieces with known answers: one head per attribute, which fusions read the image, how
an ensemble's members' scores combine."""

from __future__ import annotations

import pytest
import torch

from catalog_enrichment.config import ModelConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.errors import ConfigError
from catalog_enrichment.models.fusion import HeadSpec
from catalog_enrichment.models.model import combine_members, head_specs, needs_image

pytestmark = pytest.mark.timeout(30)


def test_one_head_per_attribute_in_taxonomy_order(taxonomy: Taxonomy) -> None:
    assert head_specs(taxonomy) == [HeadSpec(a.name, a.kind, len(a.values)) for a in taxonomy]
    assert [h.name for h in head_specs(taxonomy)] == list(taxonomy.names)


@pytest.mark.parametrize(
    ("fusion", "image"), [("text_only", False), ("image_only", True), ("concat", True), ("late", True)]
)
def test_only_fusions_that_read_the_image_need_one(fusion: str, image: bool) -> None:
    assert needs_image(ModelConfig(fusion=fusion)) is image


def test_members_combine_by_mean_or_by_vote_ties_broken_by_the_mean() -> None:
    a = torch.tensor([[0.6, 0.3, 0.1]])
    b = torch.tensor([[0.2, 0.7, 0.1]])
    c = torch.tensor([[0.5, 0.4, 0.1]])
    mean = (a + b + c) / 3
    assert torch.allclose(combine_members([a, b, c], "multiclass", "mean"), mean)
    # two members rank value 0 first, one value 1: (votes + mean) / (members + 1)
    votes = torch.tensor([[2.0, 1.0, 0.0]])
    assert torch.allclose(combine_members([a, b, c], "multiclass", "vote"), (votes + mean) / 4)
    # multi-label: a member votes for every value it scores at 0.5 or more
    assert torch.allclose(
        combine_members([a, b, c], "multilabel", "vote"), (torch.tensor([[2.0, 1.0, 0.0]]) + mean) / 4
    )
    with pytest.raises(ConfigError, match="unknown ensemble combine 'max'"):
        combine_members([a, b], "multiclass", "max")
