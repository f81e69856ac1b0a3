"""Losses: pure tensor functions."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = ["attribute_loss"]


def attribute_loss(
    logits: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    known: Mapping[str, torch.Tensor],
    kinds: Mapping[str, str],
) -> torch.Tensor:
    """Mean over attributes of: BCE summed over values (multi-label, ``targets`` (B, V) multi-hot) or
    CE (multi-class, ``targets`` (B,) index, ``-1`` = unknown). Unlabelled products are skipped."""
    total = torch.zeros((), device=next(iter(logits.values())).device)
    used = 0
    for name, lg in logits.items():
        mask = known[name].to(lg.device).bool()
        if not mask.any():
            continue
        y = targets[name].to(lg.device)
        if kinds[name] == "multilabel":
            # summed over values, averaged over products: a value's gradient does not shrink with V
            bce = F.binary_cross_entropy_with_logits(lg[mask].float(), y[mask].float(), reduction="sum")
            total = total + bce / mask.sum()
        else:
            total = total + F.cross_entropy(lg[mask].float(), y[mask].long())
        used += 1
    return total / max(used, 1)
