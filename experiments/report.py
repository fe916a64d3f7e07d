"""Runs every experiment and writes ``OUT/REPORT.md`` with their key numbers and figures.

    python -m experiments.report --quick --out results
    python -m experiments.report --quick --out results --only mc_estimators,policy_bandit
    python -m experiments.report --quick --out results --jobs 1    # one experiment at a time
    python -m experiments.report --render --out full               # REPORT.md from saved metrics

An experiment takes part when its module defines ``TITLE``, ``ORDER``, ``main`` and ``report``
(see ``experiments/_common.py``). A failing experiment is reported in its section and makes the
command exit non-zero after the others have run. Each run leaves ``OUT/NAME/run.json`` (scale, status,
seconds); ``--render`` runs nothing and writes ``OUT/REPORT.md`` from the ``OUT/NAME/metrics.json`` already
there (long full-scale studies run one by one, ``python -m experiments.NAME --out OUT/NAME``, and are
reported together).

"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import json
import multiprocessing
import os
import pathlib
import pkgutil
import platform
import sys
import time
import traceback

import experiments


def discover() -> list:
    """The experiment modules that take part in the report, in ``ORDER``."""
    found = []
    for info in pkgutil.iter_modules(experiments.__path__):
        if info.name.startswith("_") or info.name == "report" or info.name.startswith("bench"):
            continue
        module = importlib.import_module(f"experiments.{info.name}")
        if all(hasattr(module, attr) for attr in ("TITLE", "ORDER", "main", "report")):
            found.append(module)
    return sorted(found, key=lambda m: (m.ORDER, m.__name__))


def _run_one(name: str, quick: bool, out: str) -> tuple[str, str, float]:
    """Runs one experiment and renders its section: (status, markdown body, seconds)."""
    module = importlib.import_module(f"experiments.{name}")
    print(f"[report] running {name} ({'quick' if quick else 'full'})", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        metrics = module.main((["--quick"] if quick else []) + ["--out", str(pathlib.Path(out) / name)])
        body = module.report(metrics, pathlib.Path(name))
        status = "ok"
    except Exception:  # noqa: BLE001 - the report must say what failed and go on
        body = "**This experiment failed:**\n\n```\n" + traceback.format_exc() + "```\n"
        status = "FAILED"
    seconds = time.perf_counter() - start
    out_dir = pathlib.Path(out) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run.json").write_text(json.dumps(
        {"scale": "quick" if quick else "full", "status": status, "seconds": round(seconds, 1)}) + "\n")
    print(f"[report] {name}: {status} in {seconds:.1f} s", file=sys.stderr, flush=True)
    return status, body, seconds


def _flags(module, config: dict, scale: str) -> str:
    """The flags that reproduce ``config`` (saved in metrics) from the module's ``Config`` at ``scale``."""
    import dataclasses

    if not hasattr(module, "Config"):
        return ""
    base = module.Config.quick() if scale == "quick" else module.Config()
    flags = []
    for field in dataclasses.fields(base):
        if field.name not in config:
            continue
        value, default = config[field.name], getattr(base, field.name)
        if isinstance(default, tuple):
            default = list(default)
        if value != default:
            text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value).lower() \
                if isinstance(value, bool) else str(value)
            flags.append(f"--{field.name.replace('_', '-')} {text}")
    return " ".join(flags) + " " if flags else ""


def _render_one(name: str, out: str) -> tuple[str, str, float, str]:
    """Renders one experiment's section from ``OUT/NAME/metrics.json``: (status, body, seconds, scale,
    the flags that differed from the scale's ``Config``)."""
    from experiments import _common

    module = importlib.import_module(f"experiments.{name}")
    out_dir = pathlib.Path(out) / name
    if not (out_dir / "metrics.json").exists():
        return "NOT RUN", f"No `{out_dir / 'metrics.json'}`: this experiment was not run.\n", float("nan"), "?", ""
    run = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").exists() else {}
    metrics = _common.load_metrics(out_dir)
    scale = run.get("scale") or ("quick" if metrics.get("config", {}).get("quick") else "full")
    try:
        body, status = module.report(metrics, pathlib.Path(name)), run.get("status", "ok")
    except Exception:  # noqa: BLE001 - as in a run: say what failed and go on
        body, status = "**Rendering failed:**\n\n```\n" + traceback.format_exc() + "```\n", "FAILED"
    return status, body, float(run.get("seconds", float("nan"))), scale, _flags(module, metrics.get("config", {}), scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="run each experiment at its quick scale")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results"))
    parser.add_argument("--only", default="", help="comma-separated experiment names to run")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="experiments run at once, each in its own process (default: min(2, cores))")
    parser.add_argument("--render", action="store_true",
                        help="run nothing: write OUT/REPORT.md from the OUT/NAME/metrics.json already there")
    args = parser.parse_args(argv)
    if args.render and args.quick:
        parser.error("--render reads each experiment's scale from its saved metrics: drop --quick")

    modules = discover()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.__name__.split(".")[-1] for m in modules}
        if unknown:
            parser.error(f"unknown experiments: {sorted(unknown)}")
        modules = [m for m in modules if m.__name__.split(".")[-1] in wanted]

    names = [module.__name__.split(".")[-1] for module in modules]
    if args.render:
        if not args.out.is_dir():
            parser.error(f"--out {args.out} is not a folder of experiment results")
        outcomes = [_render_one(name, str(args.out)) for name in names]
        scales = sorted({o[3] for o in outcomes if o[0] != "NOT RUN"})
        scale = " and ".join(scales) if scales else "no"
        return _write(args, modules, names, outcomes, scale, rendered_from=True)
    args.out.mkdir(parents=True, exist_ok=True)
    scale = "quick" if args.quick else "full"
    jobs = max(1, min(args.jobs, len(names)))
    print(f"[report] running {len(names)} experiments ({scale}) in {jobs} process(es)", file=sys.stderr, flush=True)
    if jobs == 1:
        outcomes = [_run_one(name, args.quick, str(args.out)) for name in names]
    else:
        # Separate processes ("spawn": JAX must not be forked), results in the report's order. The
        # experiments are mostly dispatch-bound, so two processes on two cores finish sooner than one.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            outcomes = list(pool.map(_run_one, names, [args.quick] * len(names), [str(args.out)] * len(names)))
    outcomes = [(*outcome, scale, "") for outcome in outcomes]
    return _write(args, modules, names, outcomes, scale, rendered_from=False)


def _write(args, modules, names, outcomes, scale: str, *, rendered_from: bool) -> int:
    import jax

    sections, summary_rows, failures = [], [], []
    for module, name, (status, body, seconds, its_scale, flags) in zip(modules, names, outcomes):
        out_dir = args.out / name
        if status != "ok":
            failures.append(name)
        timing = f"{seconds:.1f}" if seconds == seconds else "n/a"
        summary_rows.append(f"| [{module.TITLE}](#{name}) | `{name}` | {status} | {timing} |")
        sections.append(f'<a id="{name}"></a>\n## {module.TITLE}\n\n'
                        f"`python -m experiments.{name} {'--quick ' if its_scale == 'quick' else ''}{flags}--out {out_dir}`"
                        f" ({timing} s)\n\n{body.strip()}\n")

    header = (
        "# kljax experiment report\n\n"
        f"{'Rendered from saved metrics' if rendered_from else 'Generated'} "
        f"{datetime.datetime.now().isoformat(timespec='seconds')} at the {scale} scale on "
        f"{platform.node() or 'this machine'} ({jax.default_backend()}, {jax.device_count()} device(s), "
        f"jax {jax.__version__}).\n\n"
        "| experiment | module | status | seconds |\n|---|---|---|---|\n" + "\n".join(summary_rows) + "\n"
    )
    (args.out / "REPORT.md").write_text(header + "\n" + "\n".join(sections))
    print(f"[report] wrote {args.out / 'REPORT.md'}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
