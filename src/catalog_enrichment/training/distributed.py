"""The streamed reading of the training pipeline (:mod:`.pipeline`, ``training.streaming``): in one
process or as ``training.distributed.processes`` ranks under Spark's ``TorchDistributor``.

The driver surveys the table once (:mod:`.stream`: labels, splits, unusable images, the input
baseline), then fits: in this process, or on N ranks that ``TorchDistributor`` starts with
``torchrun`` - on this machine (``local_mode``) or one per Spark task on the executors. The ranks
hold one model each under ``DistributedDataParallel`` (gloo on CPU, nccl on GPU), read their own
shard of the training split, each take a batch of ``batch_size / N`` per step (the same global
batch as one process; BatchNorm layers normalise over that global batch too,
:func:`global_batch_norm`) and all score the whole validation split after every epoch and act on
rank 0's score, so they stop at the same epoch with the same weights (training losses are averaged
over the ranks); one copy comes back. The driver alone scores the held-out splits (reading them
again), calibrates, evaluates and (in the training job) logs and registers: no rank writes to
MLflow. A rank that dies fails the run with one line.

With ``training.encoders: frozen`` the ranks train only the fusion and heads; the encoders run in
evaluation mode on every batch (nothing is cached: a stream is read once per epoch), and with
``model.encoder_runtime: onnx`` the driver scores the held-out splits through the exported graphs
that serve.

The ``stack`` fusion streams too: after the survey, one more pass embeds the usable products a
record batch at a time (each batch through the private embedding cache, keyed on its content) and
counts their n-grams; the stack is then fitted in closed form in this process over those vectors -
never the images - cross-fitted over folds that keep a product's variants together, and its
held-out splits are scored from the vectors.

What streaming leaves to the in-memory reading: cross-fitted calibration of the other fusions (they
hold out a calibration split), noise pruning, ensembles, the stack on several processes, a separate
test table and ``train_fraction``; each is refused by name.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader
from transformers import set_seed

from catalog_enrichment.config import AppConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import Collator, EncodedLabels
from catalog_enrichment.data.images import ImagePolicy
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.embeddings.frozen import (
    EmbeddedDataset,
    Embeddings,
    default_cache_dir,
    embed_products,
)
from catalog_enrichment.errors import CatalogEnrichError, ConfigError
from catalog_enrichment.faults import armed
from catalog_enrichment.health import InputBaseline
from catalog_enrichment.models import runtime
from catalog_enrichment.models.encoders import ImageEncoder
from catalog_enrichment.models.fusion import fusion_class
from catalog_enrichment.models.lexical import ngram_counts
from catalog_enrichment.models.model import deterministic_algorithms, needs_image
from catalog_enrichment.progress import progress
from catalog_enrichment.training.fit import FitResult, Validation, fit_model, make_loader
from catalog_enrichment.training.splits import MIN_ROWS, FoldPlan, calibration_fraction
from catalog_enrichment.training.stack import STACK_FOLDS, stacked
from catalog_enrichment.training.stream import (
    CALIBRATION,
    TEST,
    TRAIN,
    VALIDATION,
    Source,
    SplitBatches,
    Survey,
    TrainingRows,
    _Reader,
    _Selection,
    survey,
)
from catalog_enrichment.training.trained import Fitted, SplitName, seeded_model
from catalog_enrichment.types import Say

__all__ = ["Streamed", "global_batch_norm"]


@dataclass(frozen=True)
class _RankJob:
    """Everything a rank needs (pickled to it by ``TorchDistributor``)."""

    reader: _Reader
    cfg: AppConfig
    tokenizer: Any
    fractions: tuple[float, float, float]
    steps: int
    val_labels: EncodedLabels
    world: int
    device: str
    shard_rows: tuple[int, ...]  # each rank's training rows, as the survey found them
    val_products: tuple[Any, ...]  # the validation split's products in table order (val_labels')
    fault: tuple[int, int] | None = None

    @property
    def batch_size(self) -> int:
        return self.cfg.training.batch_size // self.world


def _rank_main(job: _RankJob, say: Say | None = None) -> tuple[dict[str, torch.Tensor], FitResult]:
    """One rank's training (in this process when there is one, reporting to ``say``): the kept
    weights and the fit, the same on every rank."""
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(job.device)
    if device.type == "cuda" and device.index is None:  # each rank its own GPU of those it sees
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if job.world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        with deterministic_algorithms(True), global_batch_norm(job.world > 1):
            return _fit_rank(job, rank, device, say or (print if rank == 0 else (lambda _m: None)))
    finally:
        if job.world > 1:
            dist.destroy_process_group()


@contextlib.contextmanager
def global_batch_norm(enabled: bool = True) -> Iterator[None]:
    """Training-mode batch normalisation over the global batch of every rank, as one process
    normalises its batch: each BatchNorm layer's mean and variance are summed over the ranks with a
    differentiable all-reduce (gradients flow back through the statistics to every rank's rows, as
    in ``torch.nn.SyncBatchNorm``, which runs on GPUs only), and the running statistics move by the
    global ones. Without it, N ranks on a batch of ``batch_size / N`` each normalise over
    ``batch_size / N`` rows and train a different model from one process. Every module that calls
    ``torch.nn.functional.batch_norm`` (torch's BatchNorm, timm's BatchNormAct) is covered while the
    context is open; evaluation mode is untouched. A rank is a process of its own, so the swap is
    local to it."""
    if not enabled:
        yield
        return
    import torch.nn.functional as F

    local = F.batch_norm
    F.batch_norm = functools.partial(_global_batch_norm, local)
    try:
        yield
    finally:
        F.batch_norm = local


def _global_batch_norm(
    local: Callable[..., torch.Tensor],
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    if not training:
        return local(x, running_mean, running_var, weight, bias, training, momentum, eps)
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_gather_single

    # each rank's row count, mean and sum of squared deviations, gathered in one collective (its
    # backward sums the gradients back to every rank), combined as Chan et al.'s parallel variance
    dims, channels = [0, *range(2, x.dim())], x.size(1)
    shape = [1, -1] + [1] * (x.dim() - 2)
    local_mean = x.mean(dims)
    local_m2 = (x - local_mean.view(shape)).square().sum(dims)
    stats = torch.cat([x.new_tensor([x.numel() // channels]), local_mean, local_m2])
    every = all_gather_single(stats.unsqueeze(0), 0, cast(dist.ProcessGroup, dist.group.WORLD))
    counts, means, m2s = every[:, :1], every[:, 1 : channels + 1], every[:, channels + 1 :]
    count = counts.sum()
    mean = (counts * means).sum(0) / count
    var = (m2s + counts * (means - mean).square()).sum(0) / count
    centred = x - mean.view(shape)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.detach() * count / (count - 1), alpha=momentum)
    out = centred * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


def _fit_rank(
    job: _RankJob, rank: int, device: torch.device, say: Say
) -> tuple[dict[str, torch.Tensor], FitResult]:
    from torch.nn.parallel import DistributedDataParallel

    cfg, reader = job.cfg, job.reader
    set_seed(cfg.training.seed)
    model = seeded_model(cfg.model, reader.taxonomy, job.tokenizer, cfg.training.seed, device)
    if model.image_encoder is not None:  # channels-last before DDP lays out its gradient buckets
        model.image_encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # some weights never reach the loss (a text backbone's pooler; a fusion's unused branch)
    step_model = DistributedDataParallel(model, find_unused_parameters=True) if job.world > 1 else model
    collator = Collator(job.tokenizer, cfg.model.text.max_length)
    rows = TrainingRows(
        reader,
        _Selection(cfg.training.seed, job.fractions, TRAIN, rank, job.world),
        take=job.steps * job.batch_size,
        shuffle_rows=cfg.training.streaming.shuffle_rows,
        kill_at=job.fault[1] * job.batch_size if job.fault and job.fault[0] == rank else None,
        expected=job.shard_rows[rank],
    )
    loader = DataLoader(rows, batch_size=job.batch_size, collate_fn=collator, drop_last=True, num_workers=0)
    selected = _Selection(cfg.training.seed, job.fractions, VALIDATION)
    val_loader = SplitBatches(reader, selected, collator, cfg.training.batch_size * 2, job.val_products)
    tag = f"rank {rank}/{job.world}: " if job.world > 1 else ""
    validation = Validation(val_loader, job.val_labels, reader.taxonomy)  # type: ignore[arg-type]
    fit = fit_model(model, loader, validation, cfg.training, device, say, tag, step_model=step_model)
    # every rank holds the same weights and fit (losses averaged over the ranks): which rank's copy
    # comes back does not matter
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, fit


def _fit_distributed(job: _RankJob, local_mode: bool) -> tuple[dict[str, torch.Tensor], FitResult]:
    """The ranks under ``TorchDistributor``, on this machine's device or, on the executors, the one
    Spark gives their tasks (:func:`_executor_device`); a rank that fails is one line naming it
    (torchrun's root cause, read from the ranks' output, which the distributor streams to this
    process: stdout on this machine, stderr from the executors)."""
    from pyspark.ml.torch.distributor import TorchDistributor
    from pyspark.sql import SparkSession

    if not local_mode:  # the ranks run on the executors: their GPUs count, not the driver's
        gpus = SparkSession.active().conf.get("spark.task.resource.gpu.amount", "0")
        job = replace(job, device=_executor_device(job.cfg.inference.device, gpus))
    distributor = TorchDistributor(
        num_processes=job.world, local_mode=local_mode, use_gpu=job.device.startswith("cuda")
    )
    lines: collections.deque[str] = collections.deque(maxlen=400)
    try:
        with (
            contextlib.redirect_stdout(_Tee(sys.stdout, lines)),
            contextlib.redirect_stderr(_Tee(sys.stderr, lines)),
        ):
            result = distributor.run(_rank_main, job)
    except Exception as exc:
        where = "this machine" if local_mode else "the executors"
        cause = _root_cause("\n".join(lines) + "\n" + str(exc))
        raise CatalogEnrichError(
            f"distributed training failed ({job.world} processes on {where}): {cause}; nothing was registered"
        ) from None
    return cast(tuple[dict[str, torch.Tensor], FitResult], result)


def _executor_device(setting: str, task_gpus: str | None) -> str:
    """The device of ranks on the executors for ``inference.device`` ``setting``: ``auto`` is CUDA
    when Spark gives each task GPUs (``task_gpus``: ``spark.task.resource.gpu.amount``, what
    ``TorchDistributor`` reads), else the CPU. The driver's own ``auto`` says nothing about them: on
    Kubernetes (deploy/spark/k8s.conf) only the executors have GPUs."""
    if setting != "auto":
        return setting
    return "cuda" if float(task_gpus or 0) > 0 else "cpu"


class _Tee(io.TextIOBase):
    """Writes through to ``out`` and keeps the last lines written in ``lines``."""

    def __init__(self, out: Any, lines: collections.deque[str]) -> None:
        self.out, self.lines = out, lines

    def write(self, text: str) -> int:
        self.out.write(text)
        self.lines.extend(text.splitlines())
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def _root_cause(text: str) -> str:
    """torchrun's first observed failure (which rank, how it ended), else the last error line."""
    block = text.rsplit("Root Cause", 1)[-1] if "Root Cause" in text else ""
    rank = re.search(r"rank\s*:\s*(\d+)", block)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", block)
    signal_name = re.search(r"\((SIG[A-Z]+)\)", block)
    if rank and code:
        how = f"signal {signal_name.group(1)}" if signal_name else f"exit code {code.group(1)}"
        return f"rank {rank.group(1)} ended with {how}"
    errors = [ln.strip() for ln in text.splitlines() if "Error" in ln or "error" in ln]
    return (errors or ["no output from the ranks"])[-1][:300]


def _check(cfg: AppConfig, source: Source, test_table: bool) -> None:
    """What streaming does not do, refused by name (see the module docstring)."""
    tcfg, world = cfg.training, cfg.training.distributed.processes
    stack = fusion_class(cfg.model.fusion).needs_lexical
    refused = [
        (
            bool(tcfg.crossfit_folds) and not stack,
            "training.crossfit_folds (streaming calibrates on a held-out split: 0)",
        ),
        (tcfg.noise_pruning.enabled, "training.noise_pruning"),
        (cfg.model.ensemble.members > 1, "model.ensemble"),
        (stack and world > 1, "model.fusion: stack on several processes (it is fitted in closed form, here)"),
        (tcfg.train_fraction < 1, "training.train_fraction below 1"),
        (test_table, "a separate test table"),
    ]
    names = [name for bad, name in refused if bad]
    if names:
        raise ConfigError(f"training.streaming does not support {', '.join(names)}")
    if tcfg.batch_size % world:
        raise ConfigError(
            f"training.batch_size {tcfg.batch_size} must divide by training.distributed.processes {world}"
        )
    if source.rows < MIN_ROWS:
        raise CatalogEnrichError(
            f"the labelled table has {source.rows} rows; training needs at least {MIN_ROWS}"
        )


@dataclass(frozen=True)
class _Streaming:
    """The survey pass's findings with the reader and split fractions every later pass uses."""

    found: Survey
    reader: _Reader
    fractions: tuple[float, float, float]

    @property
    def texts(self) -> list[str]:
        return self.found.texts

    @property
    def inputs(self) -> InputBaseline:
        return self.found.inputs

    @property
    def own_labels(self) -> EncodedLabels:
        return self.found.labels


@dataclass(frozen=True)
class Streamed:
    """The streamed reading of the training pipeline (see the module docstring)."""

    source: Source
    taxonomy: Taxonomy
    cfg: AppConfig
    image_roots: Sequence[str | Path]
    device: torch.device
    test_table: bool = False  # a separate test table was given (refused)

    def check(self) -> None:
        _check(self.cfg, self.source, self.test_table)

    def survey(self, say: Say) -> _Streaming:
        cfg, source, tcfg = self.cfg, self.source, self.cfg.training
        preprocessing = (
            ImageEncoder(cfg.model.image).preprocessing if needs_image(cfg.model) else ImagePreprocessing()
        )
        reader = _Reader(
            source,
            self.taxonomy,
            ImagePolicy.from_config(cfg.images, self.image_roots),
            preprocessing,
            validation=cfg.validation,
        )
        fractions = (
            tcfg.validation_fraction,
            calibration_fraction(source.rows, tcfg.calibration_fraction),
            tcfg.test_fraction,
        )
        if fusion_class(cfg.model.fusion).needs_lexical:
            # the stack stops nothing early and calibrates out of fold: it trains on every product
            fractions = (0.0, 0.0, tcfg.test_fraction)
        world = tcfg.distributed.processes
        trained_tokenizer = not cfg.model.text.pretrained_path
        found = survey(
            reader, fractions, seed=tcfg.seed, world=world, say=say, texts=trained_tokenizer,
            shared_limit=cfg.validation.max_products_per_image,
            fold_groups=fusion_class(cfg.model.fusion).needs_lexical,  # the stack's cross-fit folds
        )  # fmt: skip
        say(f"streaming {source.rows:,} rows in batches; splits by hash: {found.splits.sizes()}")
        # every later pass reads the survey's products: the rows it left out are skipped by place
        return _Streaming(found, replace(reader, shared=found.shared, skipped=found.skipped), fractions)

    def fit(self, surveyed: _Streaming, tokenizer: Any, say: Say) -> Fitted:
        """Trained here or on ``training.distributed.processes`` ranks; the held-out splits read
        again in table order when scored. The stack: fitted over every product's encoder outputs,
        embedded a record batch at a time."""
        if fusion_class(self.cfg.model.fusion).needs_lexical:
            return self._fit_stack(surveyed, tokenizer, say)
        cfg, found, world = self.cfg, surveyed.found, self.cfg.training.distributed.processes
        job = _job(surveyed.reader, cfg, tokenizer, surveyed.fractions, found, world, str(self.device))
        say(f"training: {job.steps} steps per epoch, {world} process(es) of batch {job.batch_size}")
        if world == 1:
            state, fit = _rank_main(job, say)
        else:
            state, fit = _fit_distributed(job, cfg.training.distributed.local_mode)
        model = seeded_model(cfg.model, self.taxonomy, tokenizer, cfg.training.seed, self.device)
        model.load_state_dict(state)
        collator = Collator(tokenizer, cfg.model.text.max_length)
        codes = {"calibration": CALIBRATION, "validation": VALIDATION, "test": TEST}

        def batches(name: SplitName) -> SplitBatches:
            selection = _Selection(cfg.training.seed, surveyed.fractions, codes[name])
            products = found.products(codes[name])
            return SplitBatches(surveyed.reader, selection, collator, cfg.training.batch_size * 2, products)

        return Fitted(
            model,
            tokenizer,
            [fit],
            found.splits,
            found.labels,
            batches,
            self.device,
            found.product_ids,
            groups=found.groups,
        )

    def _fit_stack(self, surveyed: _Streaming, tokenizer: Any, say: Say) -> Fitted:
        """The stack over the usable products' encoder outputs (vectors and n-gram counts in memory,
        never the images), cross-fitted over folds that keep variants together."""
        cfg, found, seed = self.cfg, surveyed.found, self.cfg.training.seed
        splits, labels = found.splits, found.labels
        plan = FoldPlan(
            splits.train, labels, found.fold_groups(), cfg.training.crossfit_folds or STACK_FOLDS, seed
        )
        plan.folds()  # folds that cannot be made (too few groups) are refused before the table is embedded
        collator = Collator(tokenizer, cfg.model.text.max_length)
        embeddings = self._embedded(surveyed, tokenizer, collator, say)
        model = seeded_model(cfg.model, self.taxonomy, tokenizer, seed, self.device)
        oof, fits = stacked(model, embeddings, plan, self.taxonomy, say)

        def scoring(name: SplitName) -> DataLoader:
            rows = EmbeddedDataset(embeddings, getattr(splits, name), labels)
            return make_loader(rows, collator, cfg.training.batch_size * 2, shuffle=False, seed=0)

        ids = found.product_ids
        return Fitted(
            model,
            tokenizer,
            fits,
            splits,
            labels,
            scoring,
            self.device,
            ids,
            oof,
            encodes=False,
            groups=found.groups,
        )

    def _embedded(self, surveyed: _Streaming, tokenizer: Any, collator: Collator, say: Say) -> Embeddings:
        """Every usable product's encoder outputs and hashed n-gram counts, in the survey's order: a
        record batch embedded at a time (each through the private cache, keyed on its content)."""
        import scipy.sparse

        cfg, tcfg = self.cfg, self.cfg.training
        embedder = seeded_model(cfg.model, self.taxonomy, tokenizer, tcfg.seed, self.device)
        nfkc = embedder.fusion.nfkc
        cache = Path(tcfg.embedding_cache) if tcfg.embedding_cache else default_cache_dir()
        parts: list[dict[str, torch.Tensor]] = []
        counts = []
        # with onnx, every score selected and calibrated on comes from the graphs
        onnx = cfg.model.encoder_runtime == "onnx"
        products = surveyed.found.product_ids
        batches = progress(
            surveyed.reader.records(products), desc="embedding the table", unit="product",
            total=len(products), size=lambda batch: len(batch[0]), say=say,
        )  # fmt: skip
        with runtime.served_by_graphs(embedder, say) if onnx else contextlib.nullcontext():
            for records, categories in batches:
                part = embed_products(
                    embedder,
                    records,
                    collator,
                    batch_size=tcfg.batch_size * 2,
                    device=self.device,
                    cache_dir=cache,
                    say=lambda _m: None,
                )
                parts.append(part.tensors)
                counts.append(ngram_counts(records.title, records.description, categories, nfkc=nfkc))
        lexical = scipy.sparse.vstack(counts, format="csr")
        lexical.sort_indices()
        say(f"frozen encoders: {lexical.shape[0]:,} products embedded in {len(parts)} record batches")
        return Embeddings({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, lexical, nfkc)


def _job(
    reader: _Reader,
    cfg: AppConfig,
    tokenizer: Any,
    fractions: tuple[float, float, float],
    found: Survey,
    world: int,
    device: str,
) -> _RankJob:
    steps = found.steps(cfg.training.batch_size // world)
    if steps == 0:
        raise CatalogEnrichError(
            f"too few training products for one batch of {cfg.training.batch_size // world} per process"
        )
    fault = armed("rank")  # "<rank>:<step>", read here and sent to the ranks (catalog_enrichment.faults)
    rank_step = tuple(int(x) for x in fault.split(":")) if fault else None
    val_labels = found.labels.subset(found.splits.validation)
    return _RankJob(
        reader, cfg, tokenizer, fractions, steps, val_labels, world, device,
        shard_rows=tuple(found.shard_rows()), val_products=tuple(found.products(VALIDATION)),
        fault=rank_step,  # type: ignore[arg-type]
    )  # fmt: skip
