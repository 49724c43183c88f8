"""What each method's uploads reveal, beside its accuracy: every method on digits α = 0.5 and on
digits-domains with the honest-but-curious server probe on (`diagnostics.leakage`: 2 clients
every 5 rounds), then a figure of each method's reconstructions of one client's class-mean
images from what that client uploads with the final global model.

    .venv/bin/python benchmarks/leakage.py                 # both settings, seed 0
    .venv/bin/python benchmarks/leakage.py --table         # re-print the saved results

Writes benchmarks/results/leakage.json, benchmarks/figures/leakage_<setting>.png and prints a
Markdown table (probe metrics averaged over the probed rounds and clients).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from accuracy import RESULTS, config_path

from raysim.algorithm import ClientContext
from raysim.methods.leakage import LeakageProbe, LeakageSettings, upload_kind
from raysim.nn.training import ClientData, Preprocess
from raysim.results.sinks import CollectRounds
from raysim.run import execute, prepare
from raysim.run.checkpoints import newest_complete
from raysim.run.validate import load_config
from raysim.seeding import LEAKAGE, client_generator, derive_seed, sample_clients
from raysim.state_io import unpack
from raysim.task import make_algorithm, new_model

FIGURES = Path(__file__).parent / "figures"
SETTINGS = ["digits_a0.5", "digits_domains"]
METHODS = ["fedavg", "fedprox", "scaffold", "moon", "fedproto", "fpl", "fedtgp",
           "fedhpro-official"]
PROBE = ["diagnostics.leakage.clients_per_round=2", "diagnostics.leakage.every=5",
         "diagnostics.leakage.dlg_max_samples=16", "checkpoint.every=0"]
KEYS = ["leak_presence_exact", "leak_counts_exact", "leak_counts_mae", "leak_mean_cosine",
        "leak_image_psnr", "leak_image_ssim"]


def reconstructions(run) -> list:
    """One client's (class, truth, reconstruction) images from its upload with the newest
    global model (the lowest-id client sampled in that round)."""
    config, task = run.config, run.task
    found = newest_complete(run.run_dir)
    rounds = found.round
    state = unpack(found.read("server_state.safetensors"))
    device = torch.device("cpu")
    algorithm = make_algorithm(config, task.info, device)
    model = new_model(config, task.info, algorithm)
    broadcast = algorithm.broadcast(state)
    client = min(sample_clients(config.seed, rounds, config.data.partition.num_clients,
                                config.clients_per_round))
    indices = torch.as_tensor(task.partition.indices_of(client))
    data = ClientData(torch.as_tensor(task.dataset.train.x), torch.as_tensor(
        task.dataset.train.y), indices, Preprocess(task.dataset.spec, device))
    ctx = ClientContext(client, rounds + 1, client_generator(config.seed, rounds + 1, client),
                        device, config.train)
    update = algorithm.client_update(ctx, model, broadcast, data, None)
    probe_settings = config.diagnostics.leakage
    spec = task.dataset.spec
    probe = LeakageProbe(model, upload_kind(algorithm), spec.num_classes, spec.mean, spec.std,
                         LeakageSettings(probe_settings.inversion_steps, 3, 10**6,
                                         probe_settings.dlg_steps))
    generator = torch.Generator().manual_seed(derive_seed(config.seed, LEAKAGE, rounds, client))
    pairs = probe.reconstruct(update, broadcast.weights, data, generator)
    mean, std = probe.mean, probe.std
    return [(c, (t * std + mean).clamp(0, 1).numpy(), (r * std + mean).clamp(0, 1).numpy())
            for c, t, r in pairs]


def run_one(setting: str, method: str, seed: int, overrides: list[str]) -> tuple[dict, list]:
    config = load_config(config_path(setting, method), [f"seed={seed}", *PROBE,
                                                       "logging.progress=false", *overrides])
    run = prepare(config, RESULTS / "scratch" / f"leakage-{setting}-{method}-{seed}")
    collect = CollectRounds()
    summary = execute(run, [collect]).to_dict()
    probed = [r for r in collect.rounds if "leak_presence_exact" in r]
    row = {"setting": setting, "method": method, "seed": seed,
           "test_accuracy": collect.rounds[-1]["test_accuracy"], "status": summary["status"],
           "rounds": len(collect.rounds), "probed_rounds": len(probed),
           "wall_seconds": summary["wall_seconds"]}
    for key in KEYS:
        values = [r[key] for r in probed if key in r]
        row[key] = float(np.mean(values)) if values else math.nan
    return row, reconstructions(run)


def table(rows: list[dict]) -> str:
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        out += [f"\n{setting}\n", "| method | test acc. (%) | presence exact | counts exact | "
                "counts MAE | class-mean cosine | image PSNR (dB) | image SSIM |",
                "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["setting"] == setting):
            stopped = "" if r.get("status", "completed") == "completed" else \
                f" (stopped after round {r['rounds']}: {r['status']})"
            out.append(f"| {r['method']}{stopped} | {100 * r['test_accuracy']:.1f} | "
                       f"{_cell(r, 'leak_presence_exact')} | {_cell(r, 'leak_counts_exact')} | "
                       f"{_cell(r, 'leak_counts_mae')} | "
                       f"{_cell(r, 'leak_mean_cosine', '{:.3f}')} | "
                       f"{_cell(r, 'leak_image_psnr', '{:.1f}')} | "
                       f"{_cell(r, 'leak_image_ssim', '{:.3f}')} |")
    return "\n".join(out)


def _cell(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    return "–" if math.isnan(row[key]) else fmt.format(row[key])


def figure(setting: str, images: dict[str, list]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in images if images[m]]
    columns = max(len(images[m]) for m in methods) * 2
    fig, axes = plt.subplots(len(methods), columns, figsize=(1.3 * columns, 1.4 * len(methods)),
                             squeeze=False)
    for row, method in zip(axes, methods):
        for ax in row:
            ax.axis("off")
        for i, (c, truth, guess) in enumerate(images[method]):
            for j, (image, what) in enumerate(((truth, "true"), (guess, "server"))):
                ax = row[2 * i + j]
                ax.imshow(image.transpose(1, 2, 0).squeeze(), cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"{what} {c}", fontsize=7)
        row[0].text(-0.3, 0.5, method, transform=row[0].transAxes, ha="right", va="center",
                    fontsize=8)
    fig.suptitle(f"{setting}: one client's class-mean images and the server's reconstructions",
                 fontsize=9)
    fig.tight_layout()
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / f"leakage_{setting}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=SETTINGS)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--override", action="append", default=[],
                        help="a config key for every run, e.g. rounds=5")
    parser.add_argument("--table", action="store_true", help="re-print the saved results")
    args = parser.parse_args()
    path = RESULTS / ("leakage.json" if not args.override else "leakage_quick.json")
    if args.table:
        print(table(json.loads(path.read_text())))
        return
    rows = json.loads(path.read_text()) if path.is_file() else []
    for setting in args.settings:
        images = {}
        for method in args.methods:
            row, images[method] = run_one(setting, method, args.seed, args.override)
            rows = [r for r in rows if (r["setting"], r["method"]) != (setting, method)]
            rows.append(row)
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rows, indent=1))
            print(f"{setting} {method}: " + ", ".join(f"{k} {row[k]:.3f}" for k in
                                                      ("test_accuracy", *KEYS)), flush=True)
        print(f"figure: {figure(setting, images)}")
    print(table(rows))


if __name__ == "__main__":
    main()
