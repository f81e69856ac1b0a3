"""The review page: one static HTML file to judge a sample in a browser.

Each sampled value is shown with its product's image, title and description and three buttons (yes,
no, unsure); the reviewer types their name once. Verdicts are kept in the browser's local storage
(a reload loses nothing) and "Save verdicts" downloads a CSV verdict file (``sample_id``,
``product_id``, ``attribute``, ``value``, ``verdict``, ``reviewer``, ``reviewed_at``) for
``catalog-enrich review import``. No server, no script from elsewhere: the rows are inside the page,
the images beside it; product text is set as text, never as HTML. The page is a Jinja2 template
(``templates/review_page.html.j2``) rendered with autoescape; the rows go in through ``tojson``,
which escapes ``<``, ``>``, ``&`` and ``'``, so no merchant text can end the script element.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from catalog_enrichment.catalog.reviews import FILE_COLUMNS

__all__ = ["write_page"]

_SHOWN = (
    "sample_id",
    "product_id",
    "attribute",
    "value",
    "confidence",
    "category",
    "title",
    "description",
    "image",
)


def write_page(annotated: pa.Table, out: Path, title: str) -> Path:
    """Write the review page for the annotator table ``annotated`` (the sample file's rows) to
    ``out``; image paths are relative to it."""
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("catalog_enrichment.review", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    rows: list[dict[str, Any]] = [{k: r.get(k) for k in _SHOWN} for r in annotated.to_pylist()]
    page = environment.get_template("review_page.html.j2").render(
        title=title, rows=rows, columns=list(FILE_COLUMNS)
    )
    out.write_text(page, encoding="utf-8")
    return out
