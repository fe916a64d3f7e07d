"""The one helper module shared by the experiments: arguments, progress, saving and plotting.

Every experiment is ``python -m experiments.NAME [--quick] --out DIR`` and writes ``DIR/metrics.json``
plus PNG figures. Settings are a frozen ``Config`` dataclass with a ``quick()`` classmethod;
``parse_config`` turns its fields into flags. A module that should appear in ``results/REPORT.md`` defines

    TITLE = "..."                 # section heading
    ORDER = 10                    # position in the report (smaller first)
    def main(argv=None) -> dict   # runs the study, writes DIR, returns the metrics
    def report(metrics, out_dir) -> str   # markdown: key numbers and figure links (relative to results/)

and ``experiments.report`` discovers it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
import typing
from typing import Any, Callable, Iterable

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the flags every experiment shares: --quick, --out, --seed."""
    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="small scale (about a minute on 2 CPU cores)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results") / name,
                   help=f"output folder for metrics.json and figures (default: results/{name})")
    p.add_argument("--seed", type=int, default=0, help="base random seed")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def float_list(text: str) -> list[float]:
    """argparse type for comma-separated numbers: ``"1,0.5,0"`` -> ``[1.0, 0.5, 0.0]``."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_type(annotation) -> Callable[[str], Any]:
    if typing.get_origin(annotation) is tuple:
        (element, *_) = typing.get_args(annotation)
        if element is int:
            return lambda text: tuple(int(v) for v in float_list(text))
        if element is str:
            return lambda text: tuple(v.strip() for v in text.split(",") if v.strip())
        return lambda text: tuple(float_list(text))
    if annotation is bool:
        return _boolean
    return annotation


def parse_config(config_class, name: str, description: str, argv: list[str] | None):
    """The study's settings from the command line: ``config_class.quick()`` under ``--quick``, else
    ``config_class()``, with every field overridden by its flag when given.

    Args:
      config_class: a frozen dataclass with a ``quick()`` classmethod; fields annotated ``int``,
        ``float``, ``str``, ``bool`` (``--flag true``) or ``tuple[int | float | str, ...]`` (comma-separated)
        become flags (``seed`` is ``--seed``).
      name: the experiment's module name (for ``--out``'s default).
      description: the parser's description.
      argv: the arguments (``None``: ``sys.argv``).

    Returns:
      ``(config, args)``: the settings and the parsed namespace (``out``, ``quick``, ``no_progress``).
    """
    cli = parser(name, description)
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "seed":  # parser() has it already
            continue
        cli.add_argument(flag, type=_flag_type(hints[field.name]), default=None,
                            help=f"(default {getattr(config_class(), field.name)!r}, "
                                 f"quick {getattr(config_class.quick(), field.name)!r})")
    args = cli.parse_args(argv)
    config = config_class.quick() if args.quick else config_class()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
                 if getattr(args, f.name, None) is not None}
    return dataclasses.replace(config, **overrides), args


def progress(iterable: Iterable, *, desc: str, total: int | None = None, disable: bool = False):
    """A tqdm progress bar on stderr (plain iteration when tqdm is missing or ``disable``)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the experiments extra
        return iterable
    return tqdm(iterable, desc=desc, total=total, disable=disable, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _to_jsonable(np.asarray(value).tolist())
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else (float("inf") if value > 0 else float("-inf"))
    return value


def save_metrics(out_dir: pathlib.Path, metrics: dict) -> pathlib.Path:
    """Writes ``metrics`` (numpy/JAX values converted) to ``out_dir/metrics.json``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(_to_jsonable(metrics), indent=2, allow_nan=True) + "\n")
    return path


def load_metrics(out_dir: pathlib.Path) -> dict:
    return json.loads((pathlib.Path(out_dir) / "metrics.json").read_text())


def save_figure(fig, out_dir: pathlib.Path, name: str) -> pathlib.Path:
    """Saves a matplotlib figure as ``out_dir/name.png`` (150 dpi) and closes it."""
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def markdown_table(header: list[str], rows: list[list[Any]], float_format: str = "{:.4g}") -> str:
    """A GitHub markdown table; floats formatted with ``float_format``."""
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return float_format.format(float(v))
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start


def run_main(main: Callable[[list[str] | None], dict]) -> None:
    """Entry point helper for ``if __name__ == "__main__": run_main(main)``."""
    main(sys.argv[1:])
