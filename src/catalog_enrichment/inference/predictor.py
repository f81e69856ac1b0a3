"""The per-batch predictor: Arrow or pandas in, scores out. No Spark here; the Spark job wraps it.

Load once, predict many: construction takes a loaded :class:`ModelBundle` and a device chosen by the
caller. Each call re-cuts its input to the model's batch size and runs a small pipeline:

* a thread pool prepares the next batches (image read + decode + resize, one fast-tokenizer call
  per batch) while the current one runs through the model — PIL and the Rust tokenizer release the
  GIL, so on a GPU the forward pass, not decoding, sets the pace; a GPU gets the pixels as uint8
  (a quarter of the bytes to copy) and normalises them itself;
* the forward pass runs under ``torch.inference_mode()`` (bf16 autocast and pinned, non-blocking
  copies on CUDA).

Images: a row with no image (null bytes and no URI) is scored as an imageless product — the model
is trained and calibrated with such products (``image_present`` = 0). A row whose image bytes or URI
are present but do not decode is *not* scored as imageless: its ``image_error`` says why, and the
enrichment job quarantines it. A text-only model reads no image: nothing is decoded (003's
deployment saving) and no row has an ``image_error``.

The embedding store (``embedding_store``, for a model whose bundle has an encoder fingerprint):
each row's ``content`` is a digest of exactly what the encoders read (title and description; the
image bytes and URI, unless the model is text-only); a row whose input carries a
``stored_content`` equal to it and a ``stored_embedding`` is not decoded, tokenized or encoded - its
stored vector goes straight to the fusion. The others are encoded and their packed vectors come
back in :class:`Scores` for the caller to store.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeAlias, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from catalog_enrichment.catalog.embeddings import STORED_COLUMNS, split_content
from catalog_enrichment.contracts import SCORES_FINITE
from catalog_enrichment.data.dataset import Collator
from catalog_enrichment.data.images import image_tone, read_pixels
from catalog_enrichment.embeddings import vectors as embedding
from catalog_enrichment.errors import ContractError
from catalog_enrichment.inference.bundle import ModelBundle
from catalog_enrichment.inference.options import PredictorOptions
from catalog_enrichment.models.lexical import as_bags, ngram_counts
from catalog_enrichment.models.model import (
    LEXICAL_KEYS,
    AnyModel,
    EnsembleModel,
    MultimodalModel,
    full_float32,
    lexical_inputs,
)

__all__ = [
    "BatchPredictor",
    "PredictorOptions",
    "PreparedBatch",
    "Scores",
    "column_values",
    "keep_freed_memory",
    "score_columns",
]

INPUT_COLUMNS = ("product_id", "title", "description", "image", "image_uri")

Data: TypeAlias = pa.RecordBatch | pa.Table | pd.DataFrame


def score_columns(bundle: ModelBundle) -> list[str]:
    """Output column names, ``<attribute>=<value>``, in taxonomy order (derived attributes last)."""
    return [f"{a.name}={v}" for a in bundle.taxonomy.outputs for v in a.values]


@dataclass
class PreparedBatch:
    """Model inputs of one batch (CPU tensors), the per-row image errors and the colour balance of
    each photo decoded (``tone``, None where none was: the run health checks count it).

    With the embedding store: ``inputs`` hold only the rows to encode (``encode``, their positions);
    ``stored`` the packed vectors of the others; ``content`` every row's digest.
    """

    inputs: dict[str, torch.Tensor]
    image_error: list[str | None]
    tone: list[float | None]
    image_digest: list[str | None]  # of the image bytes read (data.images.read_pixels), or stored; None: none
    content: list[str] | None = None
    encode: np.ndarray | None = None
    stored: np.ndarray | None = None
    lexical: dict[str, torch.Tensor] | None = None  # every row's n-grams, for a lexical fusion

    def __len__(self) -> int:
        return len(self.image_error)


@dataclass
class Scores:
    """``probs``: attribute -> ``(n, n_values)`` float32; ``image_error``: ``(n,)`` reason or None;
    ``tone``: each photo's colour balance where one was decoded (``data.images.image_tone``);
    ``image_digest``: each row's digest of the image bytes read (None where none were; a row fused
    from its stored vector has the digest stored with it), by which the same photo on many products
    is found a placeholder; ``fused``: which rows were fused from their stored vector (no photo read).

    With the embedding store: ``content`` every row's digest, ``embedding`` the packed vector of each
    row encoded by this call (None for rows read from the store and rows whose image failed).
    """

    probs: dict[str, np.ndarray]
    image_error: list[str | None]
    tone: list[float | None]
    content: list[str] | None = None
    embedding: list[bytes | None] | None = None
    image_digest: list[str | None] | None = None
    fused: list[bool] | None = None  # per row, its stored vector fused (no photo read); None: no store

    @property
    def reused(self) -> int:
        """How many rows were fused from their stored vector."""
        return sum(self.fused) if self.fused is not None else 0

    def finite(self) -> Scores:
        """These scores with every product the model scored NaN or infinite anywhere marked as
        failed (:data:`~catalog_enrichment.contracts.SCORES_FINITE`, quarantined like an image that
        failed) and its scores zeroed: a model fault costs its products, not the batch."""
        probs = {a: np.asarray(p) for a, p in self.probs.items()}
        bad = np.zeros(len(self.image_error), bool)
        for p in probs.values():
            bad |= ~np.isfinite(p).all(axis=1)
        if not bad.any():
            return self
        errors = [SCORES_FINITE if b and e is None else e for e, b in zip(self.image_error, bad, strict=True)]
        probs = {a: np.where(bad[:, None], 0.0, p).astype(p.dtype) for a, p in probs.items()}
        vectors = self.embedding  # an encoder's NaN vector is not stored: it would score NaN for good
        if vectors is not None:
            vectors = [None if b else v for v, b in zip(vectors, bad, strict=True)]
        return replace(self, probs=probs, image_error=errors, embedding=vectors)


def _names(data: Data) -> list[str]:
    return data.schema.names if isinstance(data, pa.RecordBatch | pa.Table) else list(data.columns)


def column_values(data: Data, name: str) -> list[Any]:
    """A column as a Python list (Nones when the batch lacks it). A pandas string that cannot be
    UTF-8 (a lone surrogate: an emoji cut in half by a client) has the character replaced, as the
    tokenizer and the n-grams cannot take it; Arrow strings are UTF-8 already."""
    if name not in _names(data):
        return [None] * (data.num_rows if isinstance(data, pa.RecordBatch | pa.Table) else len(data))
    if isinstance(data, pa.RecordBatch | pa.Table):
        values: list[Any] = data.column(name).to_pylist()
        return values
    return [_utf8(v) if isinstance(v, str) else v for v in data[name].tolist()]


def _utf8(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="replace").decode()
    return text


def _checked(batches: Iterable[Data]) -> Iterator[Data]:
    for data in batches:
        if "title" not in _names(data):
            raise ContractError(f"input batch lacks column 'title'; expected {list(INPUT_COLUMNS)}")
        yield data


# glibc mallopt parameters (malloc.h) and the values keep_freed_memory sets
_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD = -1, 1 << 30
_M_MMAP_THRESHOLD, _KEEP_MMAP_THRESHOLD = -3, 256 << 20


@functools.cache  # once per process
def keep_freed_memory() -> bool:
    """Let this process's C heap keep the memory it frees (glibc only; once per process).

    glibc hands every block over its dynamic mmap threshold back to the kernel on ``free`` and trims
    the heap's top above 128 KiB, so a CPU forward pass - PyTorch's CPU allocator is plain
    ``malloc`` - faults its activations in again page by page on every batch: ~20,000 minor faults
    per batch of 128 for the demo model, a third of the forward pass in kernel time on a virtual
    machine. Raising both thresholds (blocks under 256 MiB are never mmapped; the heap is trimmed
    only past 1 GiB free) keeps that memory in the process: zero faults per batch in steady state,
    raw forward passes 20-30 % faster. The cost: the process's RSS stays at its peak working set,
    which is bounded by the batch size. Returns whether the setting took; non-glibc systems keep
    their allocator's defaults.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _KEEP_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD)
    )


class BatchPredictor:
    """Scores batches of products with one loaded model."""

    def __init__(
        self,
        bundle: ModelBundle,
        options: PredictorOptions | None = None,
        *,
        device: torch.device | str = "cpu",
    ) -> None:
        options = options or PredictorOptions()
        self.bundle = bundle
        self.image_policy = options.image_policy
        self.placeholders = options.placeholders
        self.device = torch.device(device)
        self.batch_size = options.batch_size
        self.decode_threads = max(1, options.decode_threads)
        self.autocast = options.autocast and self.device.type == "cuda"
        self.preprocessing = bundle.preprocessing
        # a text-only model never decodes an image, so an unusable one does not quarantine its row
        self.reads_images = bundle.model.image_encoder is not None
        self.collator = Collator(bundle.tokenizer, bundle.model_config.text.max_length)
        fusions = [m.fusion for m in _members(bundle.model)]
        self.lexical = any(f.needs_lexical for f in fusions)
        self.nfkc = any(f.nfkc for f in fusions)
        # the store serves a fingerprinted bundle, whose model is one MultimodalModel (storable), on
        # the CPU: the fingerprint names the CPU's encoders (ONNX Runtime's, where the bundle has
        # them), and a GPU's encodes differ from them in the last bits
        stores = (
            options.embedding_store and bundle.encoder_fingerprint is not None and self.device.type == "cpu"
        )
        self._stored_model = cast(MultimodalModel, bundle.model) if stores else None
        self.width = embedding.width(self._stored_model) if self._stored_model is not None else 0
        # Channels-last: the image encoder's convolutions run about 1.7x faster on CPU (oneDNN
        # works in NHWC), and the decoded pixels arrive in that order anyway.
        self.channels_last = options.channels_last
        memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        self.bundle.model.to(self.device).to(memory_format=memory_format).eval()  # type: ignore[call-overload]
        tune_worker_process(self.device, keep_memory=options.keep_memory)
        self._pool: ThreadPoolExecutor | None = None

    # -- preparation (runs in the pool) ---------------------------------------------------------
    def prepare(
        self,
        titles: Sequence[Any],
        descriptions: Sequence[Any],
        images: Sequence[Any],
        uris: Sequence[Any],
        stored_content: Sequence[Any] | None = None,
        stored_embedding: Sequence[Any] | None = None,
        *,
        categories: Sequence[Any] | None = None,
    ) -> PreparedBatch:
        """Decode, resize and normalise the images and tokenize the texts of one batch (with the
        store: of its rows whose stored vector is missing or stale); a lexical model's n-grams also
        count the merchant's ``categories``."""
        n = len(titles)
        if self._stored_model is None:
            return self._encoder_inputs(titles, descriptions, images, uris, categories)
        text = self._stored_model.fusion.needs_text
        content = [
            embedding.content_digest(*row, text=text, images=self.reads_images)
            for row in zip(titles, descriptions, images, uris, strict=True)
        ]
        stored = np.zeros((n, self.width), np.float32)
        hit = np.zeros(n, bool)
        digests: list[str | None] = [None] * n
        for i, (have, vector) in enumerate(
            zip(stored_content or (), stored_embedding or (), strict=True) if stored_content else ()
        ):
            key, image = split_content(have) if isinstance(have, str) else (None, None)
            if (
                key == content[i]
                and vector is not None
                and len(vector) == 4 * self.width
                and image not in self.placeholders
                and (not self.reads_images or self._within_policy(images[i], uris[i]))
            ):
                stored[i] = np.frombuffer(vector, np.float32)
                hit[i] = True
                digests[i] = image  # counted with the bytes read: a placeholder is found either way
        (encode,) = np.nonzero(~hit)
        rows = encode.tolist()
        columns = (titles, descriptions, images, uris)
        part = (
            self._encoder_inputs(*([column[i] for i in rows] for column in columns))
            if rows
            else PreparedBatch({}, [], [], [])
        )
        errors: list[str | None] = [None] * n
        tones: list[float | None] = [None] * n
        for k, i in enumerate(rows):
            errors[i], tones[i], digests[i] = part.image_error[k], part.tone[k], part.image_digest[k]
        every = _lexical(titles, descriptions, categories, self.nfkc) if self.lexical else None
        return PreparedBatch(part.inputs, errors, tones, digests, content, encode, stored, every)

    def _within_policy(self, raw: object, uri: object) -> bool:
        """Whether today's image policy still allows the image a stored vector was encoded from (its
        inline bytes' size, format and pixels, from the header; or its URI's scheme, host and root,
        without reading): where it does not, the product is read again and fails as the policy
        says, instead of being fused from a vector the policy would no longer let the run compute."""
        if isinstance(raw, bytes | bytearray | memoryview):
            return self.image_policy.allows_bytes(bytes(raw))
        return not (isinstance(uri, str) and uri) or self.image_policy.refuses(uri) is None

    def _encoder_inputs(
        self,
        titles: Sequence[Any],
        descriptions: Sequence[Any],
        images: Sequence[Any],
        uris: Sequence[Any],
        categories: Sequence[Any] | None = None,
    ) -> PreparedBatch:
        n = len(titles)
        prep = self.preprocessing
        size = prep.decode_size if self.reads_images else 1  # a text-only model never sees the pixels
        pixels = np.zeros((n, size, size, 3), np.uint8)
        present = np.zeros(n, np.float32)
        errors: list[str | None] = [None] * n
        tones: list[float | None] = [None] * n
        digests: list[str | None] = [None] * n
        for i, (raw, uri) in enumerate(zip(images, uris, strict=True) if self.reads_images else ()):
            # no image at all: scored as an imageless product; an unusable one: an error to quarantine
            decoded, errors[i], digests[i] = read_pixels(
                raw, uri, size, prep.interpolation, self.image_policy, prep.decode
            )
            if decoded is not None:
                pixels[i] = decoded
                present[i] = 1.0
                tones[i] = image_tone(decoded)
        inputs = self.collator.tokenize(
            [t if isinstance(t, str) else "" for t in titles],
            [d if isinstance(d, str) else "" for d in descriptions],
        )
        # In the decoded (N, H, W, C) order the (N, C, H, W) view is a channels-last tensor, the
        # layout the model runs in. A GPU gets the uint8 pixels (a quarter of the bytes to copy) and
        # normalises them itself; on a CPU the prepare thread normalises them, in the forward pass's
        # gaps (inside the forward pass it slowed the paired predictor/raw ratio by ~0.06).
        image = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        if self.device.type != "cuda":
            image = prep.normalize(image)
        inputs["pixel_values"] = image if self.channels_last else image.contiguous()
        inputs["image_present"] = torch.from_numpy(present)
        if self.lexical:
            inputs.update(_lexical(titles, descriptions, categories, self.nfkc))
        if self.device.type == "cuda":
            inputs = {k: v.pin_memory() for k, v in inputs.items()}
        return PreparedBatch(inputs, errors, tones, digests)

    def _chunks(self, batches: Iterable[Data]) -> Iterator[tuple[Data, bool, tuple[list[Any], ...] | None]]:
        """``(input, is_last_chunk, columns)`` per model batch; an empty input gives one empty chunk."""
        for data in batches:
            names: tuple[str, ...] = ("title", "description", "image", "image_uri")
            if self._stored_model is not None and STORED_COLUMNS[0] in _names(data):
                names += STORED_COLUMNS
            names += ("category",)  # the last: prepare takes it by name
            cols = [column_values(data, c) for c in names]
            n = len(cols[0])
            if n == 0:
                yield data, True, None
            for start in range(0, n, self.batch_size):
                end = start + self.batch_size
                yield data, end >= n, tuple(c[start:end] for c in cols)

    def _prepared(self, batches: Iterable[Data]) -> Iterator[tuple[Data, bool, PreparedBatch | None]]:
        """The chunks of ``batches`` prepared in order, ``decode_threads`` chunks ahead of the consumer.

        The look-ahead runs across input batches, so the pool keeps decoding while the last model
        batch of one Arrow batch is in the forward pass and no input batch starts with an idle model.
        """
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="prepare")
        ahead: deque[tuple[Data, bool, Future[PreparedBatch] | None]] = deque()

        def oldest() -> tuple[Data, bool, PreparedBatch | None]:
            data, last, future = ahead.popleft()
            return data, last, None if future is None else future.result()

        for data, last, chunk in self._chunks(batches):
            future = None
            if chunk is not None:
                *columns, categories = chunk
                future = self._pool.submit(self.prepare, *columns, categories=categories)
            ahead.append((data, last, future))
            if len(ahead) > self.decode_threads:
                yield oldest()
        while ahead:
            yield oldest()

    def prepared(self, data: Data) -> Iterator[PreparedBatch]:
        """Prepared model batches of one input, in order (what ``raw`` benchmarks feed the model)."""
        for _, _, batch in self._prepared([data]):
            if batch is not None:
                yield batch

    # -- forward --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: PreparedBatch) -> dict[str, np.ndarray]:
        """Attribute -> probabilities of one prepared batch (with the store: the batch's ``stored``
        vectors completed by the encoded rows', which :meth:`score_stream` hands on)."""
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.inputs.items()}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with full_float32(), autocast:
            model = self._stored_model
            if batch.stored is None or batch.encode is None or model is None:
                out = self.bundle.model(inputs)
            else:
                if len(batch.encode):
                    batch.stored[batch.encode] = embedding.pack(model, model.encode(inputs))
                fused = embedding.unpack(model, batch.stored, self.device)
                if batch.lexical is not None:
                    fused.lexical = lexical_inputs({k: v.to(self.device) for k, v in batch.lexical.items()})
                out = model.fuse(fused)
        return {a: p.float().cpu().numpy() for a, p in out.probs.items()}

    def _fresh(self, batch: PreparedBatch) -> list[bytes | None]:
        """The packed vectors this batch encoded (rows whose image failed are not kept, nor any
        encoded under bf16 autocast: the store's vectors are float32 encodes, which a run without
        autocast fuses as its own)."""
        fresh: list[bytes | None] = [None] * len(batch)
        assert batch.stored is not None and batch.encode is not None
        if self.autocast:
            return fresh
        for i in batch.encode:
            if batch.image_error[i] is None:
                fresh[i] = batch.stored[i].tobytes()
        return fresh

    def score_stream(self, batches: Iterable[Data]) -> Iterator[tuple[Data, Scores]]:
        """``(input, its scores)`` for every input batch (Arrow or pandas), in order.

        Rows are re-cut to the model's batch size within each input; preparation runs ahead across
        inputs (a Spark task's stream of Arrow batches is one pipeline, not one per batch).
        """
        probs: dict[str, list[np.ndarray]] = {a.name: [] for a in self.bundle.taxonomy}
        errors: list[str | None] = []
        tones: list[float | None] = []
        digests: list[str | None] = []
        content: list[str] = []
        fresh: list[bytes | None] = []
        fused: list[bool] = []
        for data, last, batch in self._prepared(_checked(batches)):
            if batch is not None:
                for a, p in self.forward(batch).items():
                    probs[a].append(p)
                errors.extend(batch.image_error)
                tones.extend(batch.tone)
                digests.extend(batch.image_digest)
                if batch.content is not None:
                    content.extend(batch.content)
                    fresh.extend(self._fresh(batch))
                    hit = np.ones(len(batch), bool)
                    hit[batch.encode] = False
                    fused.extend(hit.tolist())
            if last:
                yield (
                    data,
                    Scores(
                        self.bundle.taxonomy.derive(
                            {
                                a.name: np.concatenate(probs[a.name])
                                if probs[a.name]
                                else np.zeros((0, len(a.values)), np.float32)
                                for a in self.bundle.taxonomy
                            }
                        ),
                        errors,
                        tones,
                        content if self._stored_model is not None else None,
                        fresh if self._stored_model is not None else None,
                        digests,
                        fused if self._stored_model is not None else None,
                    ),
                )
                probs = {a.name: [] for a in self.bundle.taxonomy}
                errors, tones, digests, content, fresh, fused = [], [], [], [], [], []

    def score_arrow(self, data: Data) -> Scores:
        """Scores and image errors of every row of ``data`` (Arrow or pandas), in order."""
        ((_, scores),) = self.score_stream([data])
        return scores

    def score(self, frame: pd.DataFrame | pa.RecordBatch | pa.Table) -> dict[str, np.ndarray]:
        """Attribute (derived ones too) -> ``(len(frame), n_values)`` probabilities."""
        return self.score_arrow(frame).probs

    def score_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Scores as a DataFrame with one ``<attribute>=<value>`` column per value; NaN in every
        column of a product the job would quarantine instead of scoring (its image cannot be used -
        under the default image policy an ``image_uri`` is never read - or the model scored it NaN
        or infinite), never its scores as a product without an image."""
        scored = self.score_arrow(frame).finite()
        failed = np.array([e is not None for e in scored.image_error], bool)
        blocks = [scored.probs[a.name] for a in self.bundle.taxonomy.outputs]
        data = np.concatenate(blocks, axis=1).astype(np.float64) if blocks else np.zeros((len(frame), 0))
        data[failed] = np.nan
        return pd.DataFrame(data, columns=score_columns(self.bundle), index=frame.index)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _members(model: AnyModel) -> list[MultimodalModel]:
    return model.member_models if isinstance(model, EnsembleModel) else [model]


def _lexical(
    titles: Sequence[Any], descriptions: Sequence[Any], categories: Sequence[Any] | None, nfkc: bool
) -> dict[str, torch.Tensor]:
    """The batch entries of the texts' hashed n-grams (``models.lexical``)."""
    counts = ngram_counts(titles, descriptions, categories, nfkc=nfkc)
    return dict(zip(LEXICAL_KEYS, as_bags(counts), strict=True))


def tune_worker_process(device: torch.device, *, keep_memory: bool) -> None:
    """The scoring process's own settings (``runtime``'s table): on a CPU the tokenizer runs
    single-threaded (the prepare threads tokenize; its own thread pool would only compete with the
    forward pass for the same cores); with ``keep_memory`` freed memory is kept
    (:func:`keep_freed_memory`). On a GPU float32 stays float32 (the scores the thresholds were
    calibrated on) within each forward pass (:func:`full_float32`), not process-wide."""
    if device.type == "cpu":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if keep_memory:
        keep_freed_memory()
