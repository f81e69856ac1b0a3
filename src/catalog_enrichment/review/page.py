"""The review page: one static HTML file to judge a sample in a browser.

Each sampled value is shown with its product's image, title and description and three buttons (yes,
no, unsure); the reviewer types their name once. Verdicts are kept in the browser's local storage
(a reload loses nothing) and "Save verdicts" downloads a CSV verdict file (``sample_id``,
``product_id``, ``attribute``, ``value``, ``verdict``, ``reviewer``, ``reviewed_at``) for
``catalog-enrich review import``. No server, no script from elsewhere: the rows are inside the page,
the images beside it; product text is set as text, never as HTML.
"""

from __future__ import annotations

import html
import json
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

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Review __TITLE__</title>
<style>
body { font: 15px/1.4 system-ui, sans-serif; margin: 0; background: #f4f4f4; }
header { position: sticky; top: 0; background: #fff; padding: 10px 16px; border-bottom: 1px solid #ccc;
         display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 12px;
       padding: 16px; }
.item { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; }
.item img { width: 100%; max-height: 220px; object-fit: contain; background: #eee; }
.claim { font-size: 17px; margin: 6px 0; }
.desc { color: #555; font-size: 13px; max-height: 5.6em; overflow: auto; }
.item button { font-size: 15px; padding: 4px 14px; margin-right: 6px; }
.item button.on[data-verdict=yes] { background: #2e7d32; color: #fff; }
.item button.on[data-verdict=no] { background: #c62828; color: #fff; }
.item button.on[data-verdict=unsure] { background: #757575; color: #fff; }
</style>
</head>
<body>
<header>
  <strong>__TITLE__</strong>
  <label>Reviewer <input id="reviewer" autocomplete="name"></label>
  <span id="progress"></span>
  <button id="save">Save verdicts</button>
  <span>Is the value right for this product? Save, then
    <code>catalog-enrich review import &lt;saved file&gt;</code></span>
</header>
<main id="items"></main>
<script type="application/json" id="rows">__ROWS__</script>
<script>
const ROWS = JSON.parse(document.getElementById("rows").textContent);
const COLUMNS = __COLUMNS__;
const KEY = "catalog-enrich-review:" + (ROWS.length ? ROWS[0].sample_id : "");
const state = JSON.parse(localStorage.getItem(KEY) || '{"reviewer": "", "verdicts": {}}');
const reviewer = document.getElementById("reviewer");
reviewer.value = state.reviewer;
reviewer.addEventListener("input", () => { state.reviewer = reviewer.value; keep(); });
function id(r) { return [r.product_id, r.attribute, r.value].join("\\u001f"); }
function keep() {
  localStorage.setItem(KEY, JSON.stringify(state));
  const done = Object.keys(state.verdicts).length;
  document.getElementById("progress").textContent = done + " / " + ROWS.length + " judged";
}
function el(tag, props, text) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  if (text !== undefined) e.textContent = text;
  return e;
}
const items = document.getElementById("items");
ROWS.forEach((r, i) => {
  const card = el("div", {className: "item", id: "item-" + i});
  if (r.image) card.append(el("img", {src: r.image, alt: r.title}));
  card.append(el("div", {className: "claim"}, r.attribute + ": " + r.value));
  card.append(el("div", {}, r.title));
  card.append(el("div", {className: "desc"}, r.description));
  card.append(el("div", {className: "meta"}, (r.category || "no category") + " \\u00b7 " + r.product_id));
  const buttons = el("div");
  for (const v of ["yes", "no", "unsure"]) {
    const b = el("button", {className: "verdict", type: "button"}, v);
    b.dataset.verdict = v;
    b.addEventListener("click", () => {
      state.verdicts[id(r)] = {verdict: v, reviewed_at: new Date().toISOString()};
      buttons.querySelectorAll("button").forEach(x => x.classList.toggle("on", x === b));
      keep();
    });
    if ((state.verdicts[id(r)] || {}).verdict === v) b.classList.add("on");
    buttons.append(b);
  }
  card.append(buttons);
  items.append(card);
});
keep();
function cell(v) { return '"' + String(v).replace(/"/g, '""') + '"'; }
document.getElementById("save").addEventListener("click", () => {
  if (!state.reviewer.trim()) { alert("Type your name as reviewer first."); reviewer.focus(); return; }
  const lines = [COLUMNS.join(",")];
  for (const r of ROWS) {
    const v = state.verdicts[id(r)];
    if (!v) continue;
    const row = Object.assign({}, r, v, {reviewer: state.reviewer.trim()});
    lines.push(COLUMNS.map(c => cell(row[c])).join(","));
  }
  const blob = new Blob([lines.join("\\n") + "\\n"], {type: "text/csv"});
  const a = el("a", {href: URL.createObjectURL(blob),
                     download: (ROWS.length ? ROWS[0].sample_id : "review") + "-verdicts.csv"});
  document.body.append(a);
  a.click();
  a.remove();
});
</script>
</body>
</html>
"""


def write_page(annotated: pa.Table, out: Path, title: str) -> Path:
    """Write the review page for the annotator table ``annotated`` (the sample file's rows) to
    ``out``; image paths are relative to it."""
    rows: list[dict[str, Any]] = [{k: r.get(k) for k in _SHOWN} for r in annotated.to_pylist()]
    # < > & as JSON escapes: no merchant text can end the script element or open a comment in it
    data = json.dumps(rows, ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        data = data.replace(char, escape)
    page = (
        _PAGE.replace("__TITLE__", html.escape(title))
        .replace("__COLUMNS__", json.dumps(list(FILE_COLUMNS)))
        .replace("__ROWS__", data)
    )
    out.write_text(page, encoding="utf-8")
    return out
