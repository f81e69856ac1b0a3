"""Variants of one article: products grouped by a shared title or description, so that no split or
fold puts one variant on each side (training, the labels' evaluation exclusion). NumPy only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MAX_GROUP", "folded", "group_ids", "table_groups", "variant_ids"]

# the largest group a shared title or description may join (group_ids): larger is a template
MAX_GROUP = 64


def folded(text: str | None) -> str:
    """``text`` compared case- and whitespace-insensitively (None: empty)."""
    return " ".join((text or "").lower().split())


def variant_ids(titles: Sequence[str | None], descriptions: Sequence[str | None]) -> np.ndarray:
    """``(n,)`` group of each product, numbered in order of first appearance: products with the same
    title and the same description (compared as :func:`group_ids` compares them; an empty
    description the same as another) - one article's variants, as the streamed path groups them."""
    first: dict[tuple[str, str], int] = {}
    keys = [(folded(t), folded(d)) for t, d in zip(titles, descriptions, strict=True)]
    return np.array([first.setdefault(k, len(first)) for k in keys], np.int64)


def group_ids(
    titles: Sequence[str], descriptions: Sequence[str | None], *, max_group: int = MAX_GROUP
) -> np.ndarray:
    """``(n,)`` group of each product, numbered in order of first appearance: products that share a
    title or a description (compared case- and whitespace-insensitively; an empty description
    links nothing) are one group, transitively - a product's variants, whose names or texts were
    edited apart, stay together.

    A shared text joins groups only up to ``max_group`` products: a boilerplate description or a
    generic title is a template, not one product's variants, and would chain much of a catalog into
    one group. A product whose group does not fit into the text's current group starts the next
    one, which the text's later products join (up to the cap again). Texts are joined rarest first
    (the ones that name one product); products with the same title and the same description are
    always one group - without a description they share a title only, which the cap holds.
    """
    n = len(titles)
    parent = np.arange(n)
    size = np.ones(n, np.int64)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def join(rows: list[int], cap: int | None) -> None:
        anchor = rows[0]
        for i in rows[1:]:
            a, b = root(anchor), root(i)
            if a == b:
                continue
            if cap is None or size[a] + size[b] <= cap:
                parent[b], size[a] = a, size[a] + size[b]
            else:  # no room for this one's group: the rows left join it instead
                anchor = i

    texts = [(folded(t), folded(d)) for t, d in zip(titles, descriptions, strict=True)]
    links: dict[tuple[str, ...], list[int]] = {}
    for i, (title, description) in enumerate(texts):
        if description:  # without one, a shared title alone: capped below
            links.setdefault(("both", title, description), []).append(i)
    for rows in links.values():
        join(rows, None)
    shared: dict[tuple[str, str], list[int]] = {}
    for i, (title, description) in enumerate(texts):
        shared.setdefault(("title", title), []).append(i)
        if description:
            shared.setdefault(("description", description), []).append(i)
    for key in sorted(shared, key=lambda k: (len(shared[k]), k)):
        join(shared[key], max_group)
    first: dict[int, int] = {}
    return np.array([first.setdefault(root(i), len(first)) for i in range(n)], np.int64)


def table_groups(table: Any) -> np.ndarray:
    """:func:`group_ids` of a products table's rows (an Arrow table: its ``title`` and, where it has
    one, ``description`` column)."""
    titles = [t or "" for t in table["title"].to_pylist()]
    names = table.column_names
    descriptions = table["description"].to_pylist() if "description" in names else [None] * len(titles)
    return group_ids(titles, descriptions)
