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
    partial: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean over attributes of: BCE summed over values (multi-label, ``targets`` (B, V) multi-hot) or
    CE (multi-class, ``targets`` (B,) index, ``-1`` = unknown), averaged over the products that carry
    a label for the attribute. Unlabelled products are skipped.

    ``partial`` (B, V) int8 per attribute: values people confirmed (1) or rejected (-1) on products
    without a full label. Multi-label: BCE on those values only. Multi-class: a confirmed value is
    its CE; a rejected value v adds ``-log(1 - p_v)``. Each such product counts once in the average.
    """
    total = torch.zeros((), device=next(iter(logits.values())).device)
    used = 0
    for name, lg in logits.items():
        mask = known[name].to(lg.device).bool()
        part = partial.get(name) if partial else None
        rows = torch.zeros_like(mask) if part is None else (part.to(lg.device) != 0).any(dim=1) & ~mask
        if not mask.any() and not rows.any():
            continue
        y = targets[name].to(lg.device)
        summed = torch.zeros((), device=lg.device)
        if kinds[name] == "multilabel":
            # summed over values, averaged over products: a value's gradient does not shrink with V
            if mask.any():
                summed = summed + F.binary_cross_entropy_with_logits(
                    lg[mask].float(), y[mask].float(), reduction="sum"
                )
            if rows.any():
                assert part is not None
                p = part.to(lg.device)[rows]
                bce = F.binary_cross_entropy_with_logits(lg[rows].float(), (p > 0).float(), reduction="none")
                summed = summed + (bce * (p != 0)).sum()
        else:
            if mask.any():
                summed = summed + F.cross_entropy(lg[mask].float(), y[mask].long(), reduction="sum")
            if rows.any():
                assert part is not None
                p = part.to(lg.device)[rows]
                log_p = F.log_softmax(lg[rows].float(), dim=1)
                confirmed = (log_p * (p > 0)).sum()
                # log(1 - p_v) = log(sum of the other values' probabilities), computed stably
                others = torch.logsumexp(log_p.unsqueeze(1) + _off_diagonal(log_p.shape[1], lg.device), dim=2)
                summed = summed - confirmed - (others * (p < 0)).sum()
        total = total + summed / (mask.sum() + rows.sum())
        used += 1
    return total / max(used, 1)


def _off_diagonal(v: int, device: torch.device) -> torch.Tensor:
    """(V, V) with 0 off the diagonal and -inf on it: row v of log-probabilities plus row v of this,
    log-sum-exp'ed, is ``log(1 - p_v)``."""
    return torch.full((v, v), 0.0, device=device).fill_diagonal_(float("-inf"))
