"""The embedding store's owner: what the encoders made of a product, kept and read back.

With frozen encoders only the fusion and heads differ between model versions, so a product's
encoder outputs are computed once and reused:

* :mod:`.vectors` - the keys and the row: the encoder fingerprint a stored vector is only ever read
  back under, each product's content digest, and the pooled outputs packed into one float32 row and
  back, bit for bit (what the enrichment job's predictor joins, fuses and stages);
* :mod:`.frozen` - training's side: every labelled product embedded once, read from and written to
  the catalog's store (or a private cache), and batches of the embedded products.

The catalogs store and return the rows (``catalog/embeddings.py``: the table's schema, the join's
columns; each backend's ``stored_embeddings`` / ``embeddings_of`` / ``write_embeddings`` /
``vacuum_embeddings``); ``training/store_fill.py`` is the job that fills the store for a version.
"""
