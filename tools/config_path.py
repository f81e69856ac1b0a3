"""Where the training job's config travels: every call inside the package that is handed the
config or one of its sections, from ``catalog-enrich train`` to the registered version.

Runs ``catalog_enrichment.cli.main(["train", ...])`` on a small synthetic marketplace with the tiny
model under ``sys.setprofile`` and counts, over the distinct (caller, callee) pairs of calls handed
the whole ``AppConfig`` (``--sections``: or any of its sections):

- steps: the pairs;
- files entered: the package files whose functions receive a config object;
  (config.py's own methods and validators are not counted);
- climbs back up: pairs whose callee's file is already on the stack below the caller's frame in
  another file (the path re-enters a file it came down from).

Usage (the package on ``sys.path`` is the one measured, e.g. an older checkout's ``src``)::

    python tools/config_path.py [--products 400] [--streaming] [--list]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any


def _package_root() -> str:
    import catalog_enrichment

    return str(Path(catalog_enrichment.__file__).parent) + "/"


def _short(filename: str, root: str) -> str:
    return filename[len(root) :] if filename.startswith(root) else filename


class _Trace:
    """The profile hook: config-carrying calls between package frames."""

    def __init__(self, root: str, config_types: tuple[type, ...]) -> None:
        self.root, self.types = root, config_types
        self.own = root + "config.py"
        self.edges: Counter[tuple[str, str]] = Counter()
        self.climbs: set[tuple[str, str]] = set()
        self.files: set[str] = set()

    def _carries_config(self, frame: FrameType) -> bool:
        code = frame.f_code
        n = code.co_argcount + code.co_kwonlyargcount
        return any(isinstance(frame.f_locals.get(name), self.types) for name in code.co_varnames[:n])

    def __call__(self, frame: FrameType, event: str, _arg: Any) -> None:
        if event != "call" or not frame.f_code.co_filename.startswith(self.root):
            return
        if frame.f_code.co_filename == self.own:  # the config's own methods and validators
            return
        if not self._carries_config(frame):
            return
        callee_file = _short(frame.f_code.co_filename, self.root)
        outer = frame.f_back
        while outer is not None and not outer.f_code.co_filename.startswith(self.root):
            outer = outer.f_back
        caller = "(entry)" if outer is None else _where(outer, self.root)
        edge = (caller, _where(frame, self.root))
        self.edges[edge] += 1
        self.files.add(callee_file)
        if outer is None or _short(outer.f_code.co_filename, self.root) == callee_file:
            return
        below = outer.f_back
        while below is not None:
            if _short(below.f_code.co_filename, self.root) == callee_file:
                self.climbs.add(edge)
                return
            below = below.f_back


def _where(frame: FrameType, root: str) -> str:
    return f"{_short(frame.f_code.co_filename, root)}:{frame.f_code.co_name}"


def _write_inputs(folder: Path, products: int, streaming: bool) -> tuple[Path, Path]:
    import yaml

    from catalog_enrichment.config import SyntheticConfig
    from catalog_enrichment.data.synthetic import generate_marketplace

    market = generate_marketplace(
        folder / "labelled", SyntheticConfig(products=products, seed=1, image_size=32)
    )
    # config.TINY_MODEL, written out: the checkouts measured "before" predate that constant
    model = {
        "hidden_dim": 32,
        "dropout": 0.0,
        "fusion": "concat",
        "text": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "intermediate_size": 64, "vocab_size": 500, "max_length": 32},
        "image": {"name": "test_byobnet", "image_size": 32},
    }  # fmt: skip
    training: dict[str, Any] = {"epochs": 1, "batch_size": 32}
    if streaming:
        training["streaming"] = {"enabled": True}
    config = folder / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": model,
                "training": training,
                "spark": {"master": "local[2]"},
                "mlflow": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"},
                "catalog": {"root": str(folder / "lakehouse")},
                "inference": {"device": "cpu"},
            }
        )
    )
    return market.products, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=400)
    parser.add_argument("--streaming", action="store_true", help="training.streaming.enabled: true")
    parser.add_argument("--list", action="store_true", help="print every step")
    parser.add_argument(
        "--sections",
        action="store_true",
        help="follow every config section too, not only the whole AppConfig",
    )
    args = parser.parse_args(argv)

    from pydantic import BaseModel

    from catalog_enrichment import config as config_module
    from catalog_enrichment.cli import main as cli_main

    types = (
        tuple(
            t
            for t in vars(config_module).values()
            if isinstance(t, type) and issubclass(t, BaseModel) and t.__module__ == config_module.__name__
        )
        if args.sections
        else (config_module.AppConfig,)
    )
    root = _package_root()
    with tempfile.TemporaryDirectory() as tmp:
        data, config = _write_inputs(Path(tmp), args.products, args.streaming)
        trace = _Trace(root, types)
        sys.setprofile(trace)
        try:
            code = cli_main(["train", "--config", str(config), "--data", str(data)])
        finally:
            sys.setprofile(None)
    if code != 0:
        print(f"training failed (exit {code})", file=sys.stderr)
        return code
    if args.list:
        for (caller, callee), calls in sorted(trace.edges.items()):
            mark = "  climbs back" if (caller, callee) in trace.climbs else ""
            print(f"{caller} -> {callee} ({calls}x){mark}")
    print(
        f"package {root}\nsteps {len(trace.edges)}, files entered {len(trace.files)}, "
        f"climbs back up {len(trace.climbs)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
