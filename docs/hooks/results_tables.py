"""MkDocs hook: results tables generated from the JSON the benchmarks write, and the
benchmarks' figures served with the site.

A page marks a table it can regenerate:

    <!-- results: throughput -->

    | the table as last measured, as text |

    <!-- /results -->

When `benchmarks/results/<file>.json` exists (the benchmark was run on this machine), the block
is replaced by a table rendered from it; otherwise the text stays. Each renderer reads the
JSON layout its benchmark script writes. A JSON file that does not fit is a warning, so
`mkdocs build --strict` fails rather than show a stale table as a fresh one.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "benchmarks" / "figures"

log = logging.getLogger("mkdocs.hooks.results_tables")

BLOCK = re.compile(r"<!-- results: (?P<name>[\w.-]+) -->(?P<text>.*?)<!-- /results -->",
                   re.DOTALL)


# --------------------------------------------------------------------------- renderers


def throughput(report: dict) -> str:
    seconds, rounds, ideal = report["seconds"], report["rounds"], report["ideal_2way_seconds"]
    workers = report["runs"]["raysim"][0].get("num_workers", "")
    rows = [("ideal 2-way (1 thread / 2)", ideal),
            ("plain PyTorch, 1 thread", seconds["plain_1_thread"]),
            ("plain PyTorch, 2 threads", seconds["plain_2_threads"]),
            (f"**raysim, {workers} workers**", seconds["raysim"])]
    if "raysim_grouped" in seconds:  # not bounded by the ideal: groups change the work
        rows.append((f"raysim, groups of {report['client_group']}", seconds["raysim_grouped"]))
    lines = ["| loop | seconds | s/round | × ideal 2-way |", "|---|---|---|---|"]
    lines += [f"| {label} | {s:.2f} | {s / rounds:.3f} | {s / ideal:.2f} |" for label, s in rows]
    return "\n".join(lines) + (f"\n\n{report['config']}, {rounds} rounds, median of "
                               f"{report['repeats']}, torch {report['torch']}.")


def checkpoint_cost(report: dict) -> str:
    lines = ["| case | loop, checkpoint only at the end | loop, `checkpoint.every: 10` | ratio "
             "| seconds per checkpoint (driver write) | MB per checkpoint |",
             "|---|---|---|---|---|---|"]
    for case, row in report["cases"].items():
        loops = row["loop_seconds"]
        lines.append(f"| {case} | {loops['end only']:.2f} s | {loops['every 10']:.2f} s | "
                     f"{row['ratio']:.3f} | {row['write_seconds_median']:.3f} | "
                     f"{row['megabytes_median']:.2f} |")
    return "\n".join(lines) + (f"\n\n{report['rounds']} rounds, median of "
                               f"{report['repeats']}.")


def client_state_memory(report: dict) -> str:
    lines = ["| stateful clients, one process | RSS | peak RSS | put / get 100 states | "
             "checkpoint snapshot | on disk |", "|---|---|---|---|---|---|"]
    for s in report["store_at_scale"]:
        lines.append(f"| {s['store']} store ({s['clients']:,}) | {s['rss_after_mib']:,.0f} MiB "
                     f"| {s['peak_mib']:,.0f} MiB | {1000 * s['put_100_seconds']:.0f} ms / "
                     f"{1000 * s['get_100_seconds']:.0f} ms | {s['snapshot_seconds']:.3f} s, "
                     f"{s['snapshot_mib']:,.1f} MiB | {s['disk_mib']:,.0f} MiB |")
    lines += ["", "| MOON run, digits, peak RSS | clients with state | driver | server | workers |",
              "|---|---|---|---|---|"]
    for r in report["runs"]:
        peak = r["peak_mib"]
        workers = " / ".join(f"{w:,.0f}" for w in peak["workers"])
        lines.append(f"| {r['store']} store | {r['clients_with_state']} | "
                     f"{peak['driver']:,.0f} MiB | {peak['server']:,.0f} MiB | {workers} MiB |")
    return "\n".join(lines)


def scale(report: dict) -> str:
    lines = ["| setting | registered clients | per round | s/round | p10–p90 | engine ms/client "
             "| first round | driver MiB | server MiB | worker MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["raysim"]:
        lines.append(f"| {r['setting']} | {r['clients']:,} | {r['per_round']:,} | "
                     f"{r['round_seconds_median']:.3f} | {r['round_seconds_p10']:.3f}–"
                     f"{r['round_seconds_p90']:.3f} | {r['overhead_ms_per_client']:.2f} | "
                     f"{r['first_round_seconds']:.1f} s | {r['driver_mb']:,.0f} | "
                     f"{r['server_mb']:,.0f} | {r['worker_mb']:,.0f} |")
    return "\n".join(lines) + (f"\n\n{report['rounds']} rounds per launch, {report['repeats']} "
                               f"launches per setting, {report['workers']} workers.")


def scale_flower(report: dict) -> str:
    ours = {r["clients"]: r for r in report["raysim"]
            if r["setting"] == "synthetic" and r["per_round"] == 100}
    lines = ["| registered clients | Flower s/round | raysim s/round | Flower / raysim |",
             "|---|---|---|---|"]
    for f in report["flower"]:
        mine = ours.get(f["clients"])
        if mine is None:
            continue
        theirs, own = f["round_seconds_median"], mine["round_seconds_median"]
        lines.append(f"| {f['clients']:,} | {theirs:.2f} | {own:.3f} | {theirs / own:.1f}× |")
    if len(lines) == 2:
        raise ValueError("no Flower rows (run benchmarks/scale.py with --flower)")
    return "\n".join(lines)


def fedbcs_cost(rows: list[dict]) -> str:
    base = rows[0]["saved_mib"]
    lines = ["| feature path, FSR | saved activations (MiB) | over the U-Net alone (MiB) | "
             "peak RSS (MiB) | s/step |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['saved_mib']:.0f} | {r['saved_mib'] - base:.0f} | "
              f"{r['peak_rss_mib']:.0f} | {r['seconds']:.2f} |" for r in rows]
    return "\n".join(lines)


def _mean_std(values: list[float], scale_by: float = 100.0) -> str:
    if not values:
        return "–"
    return (f"{statistics.fmean(values) * scale_by:.1f} ± "
            f"{statistics.pstdev(values) * scale_by:.1f}")


def accuracy(report: dict) -> str:
    results = report["results"]
    settings = list(dict.fromkeys(r["setting"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    lines = ["| method | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for method in methods:
        cells = []
        for setting in settings:
            runs = [r for r in results if r["method"] == method and r["setting"] == setting]
            last5 = statistics.fmean(r["last5"] for r in runs) * 100 if runs else math.nan
            cells.append(f"{_mean_std([r['final'] for r in runs])} ({last5:.1f})"
                         if runs else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    with_domains = [r for r in results if r.get("per_domain")]
    for setting in dict.fromkeys(r["setting"] for r in with_domains):
        rows = [r for r in with_domains if r["setting"] == setting]
        domains = list(rows[0]["per_domain"])
        lines += ["", f"| method ({setting}) | " + " | ".join(domains) + " |",
                  "|---" * (len(domains) + 1) + "|"]
        for method in dict.fromkeys(r["method"] for r in rows):
            runs = [r for r in rows if r["method"] == method]
            cells = [f"{statistics.fmean(r['per_domain'][d] for r in runs) * 100:.1f}"
                     for d in domains]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nSeeds {report['seeds']}."


def segmentation(results: list[dict]) -> str:
    out: list[str] = []
    runs_with_dice = [r for r in results if "dice" in r]
    for flavour in dict.fromkeys(r["flavour"] for r in runs_with_dice):
        rows = [r for r in runs_with_dice if r["flavour"] == flavour]
        sites = sorted({s for r in rows for s in r["per_site"]})
        out += ["", f"**{flavour}**", "",
                "| method | Dice | " + " | ".join(sites) + " | HD95 | ASD |",
                "|---|---|" + "---|" * len(sites) + "---|---|"]
        for method in dict.fromkeys(r["method"] for r in rows):
            runs = [r for r in rows if r["method"] == method]
            cells = [_mean_std([r["dice"] for r in runs])]
            cells += [_mean_std([r["per_site"][s] for r in runs]) for s in sites]
            cells += [_mean_std([r["hd95"] for r in runs], 1.0),
                      _mean_std([r["asd"] for r in runs], 1.0)]
            out.append(f"| {method} | " + " | ".join(cells) + " |")
    if not out:
        raise ValueError("no Dice runs in it")
    return "\n".join(out).strip()


def segmentation_timing(results: list[dict]) -> str:
    timing = [r for r in results if r.get("kind") == "timing"]
    if not timing:
        raise ValueError("no timing runs in it (run benchmarks/segmentation.py --timing)")
    lines = ["| flavour | fsr | s/round | vs closed_form |", "|---|---|---|---|"]
    lines += [f"| {r['flavour']} | {r['fsr']} | {r['seconds']:.2f} | {r['ratio']:.2f}× |"
              for r in timing]
    return "\n".join(lines)


def leakage(rows: list[dict]) -> str:
    """The leakage benchmark's own table (benchmarks/leakage.py renders what it writes)."""
    return _benchmark("leakage").table(rows)


def privacy(report: dict) -> str:
    """The privacy benchmark's own table (benchmarks/privacy.py renders what it writes)."""
    return _benchmark("privacy").table(report)


def _benchmark(name: str) -> Any:
    """The script benchmarks/<name>.py as a module (imported, not run); the scripts import
    each other by name."""
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def diagnostics(curves: dict[str, dict[str, list[list[float]]]]) -> str:
    keys = list(dict.fromkeys(k for by_key in curves.values() for k in by_key))
    lines = ["| method (last round, mean over seeds) | " + " | ".join(keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for method, by_key in curves.items():
        cells = []
        for key in keys:
            last = [c[-1] for c in by_key.get(key, []) if c and c[-1] is not None
                    and not math.isnan(c[-1])]
            cells.append(f"{statistics.fmean(last):.3f}" if last else "—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# name in a page's marker → (JSON file under benchmarks/results, renderer)
RENDERERS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "throughput": ("throughput.json", throughput),
    "checkpoint_cost": ("checkpoint_cost.json", checkpoint_cost),
    "client_state_memory": ("client_state_memory.json", client_state_memory),
    "scale": ("scale.json", scale),
    "scale_flower": ("scale.json", scale_flower),
    "fedbcs_cost": ("fedbcs_cost.json", fedbcs_cost),
    "accuracy": ("accuracy.json", accuracy),
    "segmentation": ("segmentation.json", segmentation),
    "segmentation_timing": ("segmentation.json", segmentation_timing),
    "leakage": ("leakage.json", leakage),
    "privacy": ("privacy.json", privacy),
    "diagnostics_digits_a0.5": ("diagnostics_digits_a0.5.json", diagnostics),
}


def generated(name: str, results: Path = RESULTS) -> str | None:
    """The table `name` rendered from its benchmark's JSON, or None where that JSON is absent.
    Raises ValueError (naming the file) when the JSON does not have the benchmark's layout."""
    if name not in RENDERERS:
        raise ValueError(f"unknown results table {name!r}; known: {', '.join(RENDERERS)}")
    file_name, render = RENDERERS[name]
    path = results / file_name
    if not path.is_file():
        return None
    try:
        table = render(json.loads(path.read_text()))
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as error:
        raise ValueError(f"{path}: not the layout {name} tables are made from "
                         f"({type(error).__name__}: {error}); rerun its benchmark") from None
    relative = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return f"{table}\n\n*Generated from `{relative}` when this site was built.*\n"


def replace_blocks(markdown: str, results: Path = RESULTS) -> str:
    def substitute(match: re.Match) -> str:
        try:
            table = generated(match["name"], results)
        except ValueError as error:
            log.warning("%s", error)
            return match["text"]
        return match["text"] if table is None else f"\n\n{table}\n"

    return BLOCK.sub(substitute, markdown)


# --------------------------------------------------------------------------- MkDocs events


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for figure in sorted(FIGURES.glob("*.png")):
        files.append(File.generated(config, f"figures/{figure.name}",
                                    abs_src_path=str(figure)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return replace_blocks(markdown)
