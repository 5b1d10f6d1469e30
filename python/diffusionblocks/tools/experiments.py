"""The ViT comparison table: end-to-end against block-wise (B = 2, 3, 4; equi vs
uniform partition; γ = 0 vs 0.05), several seeds each, all at the same layer-evaluation
budget. Writes OUT/results.json (every run's report) and OUT/table.md.

    python -m diffusionblocks.tools.experiments --out results/digits --seeds 0 1 2 --jobs 2

Runs already finished under OUT (a report.json) are reused, so an interrupted sweep
continues where it stopped. Every figure in the table comes from those reports."""

import argparse
import json
import os
import platform
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .. import config as C

# (name, overrides); B=4 on 6 layers needs an explicit split: the noisier blocks get 2 layers.
SETTINGS = [
    ("e2e", {"mode": "e2e"}),
    ("blocks B=2", {"blocks": 2}),
    ("blocks B=3", {"blocks": 3}),
    ("blocks B=4", {"blocks": 4, "split": (2, 2, 1, 1)}),
    ("blocks B=3 uniform", {"blocks": 3, "partition": "uniform"}),
    ("blocks B=3 γ=0", {"blocks": 3, "gamma": 0.0}),
]


def slug(name: str) -> str:
    return name.replace(" ", "_").replace("=", "").replace("γ", "gamma").replace("/", "-")


def run_one(preset: str, name: str, overrides: dict, seed: int, out: str, threads: int,
            extra: list[str]) -> dict:
    from ..train import Trainer  # in the worker process

    run_dir = Path(out) / slug(name) / f"seed{seed}"
    if (run_dir / "report.json").exists():
        return {**json.loads((run_dir / "report.json").read_text()), "reused": True}
    config = C.override(C.preset(preset), extra)
    for key, value in {"mode": "blocks", **overrides, "seed": seed, "threads": threads, "progress": False}.items():
        if key.startswith("model."):  # a task option, parsed as --set parses it
            config = C.override(config, [f"{key}={str(value).lower() if isinstance(value, bool) else value}"])
        else:
            setattr(config, key, value)
    if run_dir.exists():  # a run that stopped part way: continue it
        return Trainer(config, run_dir).run(resume=(run_dir / "checkpoint").exists())
    return Trainer(config, run_dir).run()


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    e2e_activation = statistics.mean(r["memory"]["activation_bytes_per_step"] for r in results["e2e"])
    rows = []
    for name, _ in SETTINGS:
        reports = results[name]
        acc = mean_std([100 * r["metrics"]["test_accuracy"] for r in reports])
        # The sampler with the authors' unnormalised label embedding E (measured on the same weights).
        unnormalized = [100 * r["metrics"]["test_accuracy_unnormalized_E"] for r in reports
                        if "test_accuracy_unnormalized_E" in r["metrics"]]
        activation = statistics.mean(r["memory"]["activation_bytes_per_step"] for r in reports)
        first = reports[0]
        rows.append({
            "setting": name, "blocks": first["blocks"], "partition": first["partition"], "gamma": first["gamma"],
            "seeds": [r["seed"] for r in reports], "accuracies": [r["metrics"]["test_accuracy"] for r in reports],
            "accuracy_mean": acc[0], "accuracy_std": acc[1],
            "accuracy_unnormalized_E": mean_std(unnormalized) if unnormalized else None,
            "layer_evals": statistics.mean(r["layer_evals"] for r in reports),
            "steps": first["steps"], "wall_s_mean": statistics.mean(r["wall_s"] for r in reports),
            "activation_bytes_per_step": activation, "activation_ratio_vs_e2e": e2e_activation / activation,
            "param_bytes": first["memory"]["param_bytes"],
            "grad_bytes": statistics.mean(r["memory"]["grad_bytes"] for r in reports),
            "optimizer_bytes": first["memory"]["optimizer_bytes"],
        })
    return rows


def markdown(rows: list[dict], header: str) -> str:
    mb = 1 / 2**20
    lines = [header, "",
             "| setting | B | partition | γ | test acc. % (mean ± std) | same, unnormalised E | seeds | steps "
             "| layer evals | wall s | activations MiB/step | ÷ vs e2e | grads MiB | optimizer MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        other = r["accuracy_unnormalized_E"]
        lines.append(
            f"| {r['setting']} | {r['blocks']} | {r['partition'] or '–'} | "
            f"{'–' if r['gamma'] is None else r['gamma']} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | "
            f"{'–' if other is None else f'{other[0]:.2f} ± {other[1]:.2f}'} | "
            f"{len(r['seeds'])} | {r['steps']} | {r['layer_evals']:.0f} | {r['wall_s_mean']:.0f} | "
            f"{r['activation_bytes_per_step'] * mb:.2f} | {r['activation_ratio_vs_e2e']:.2f} | "
            f"{r['grad_bytes'] * mb:.3f} | {r['optimizer_bytes'] * mb:.3f} |")
    by_name = {r["setting"]: r for r in rows}
    gap = by_name["e2e"]["accuracy_mean"] - by_name["blocks B=3"]["accuracy_mean"]
    lines += ["", f"Block-wise B=3 (γ=0.05, equi) vs end-to-end: {abs(gap):.2f} points "
              f"{'below' if gap >= 0 else 'above'} (target: within 1.0); activations {by_name['blocks B=3']['activation_ratio_vs_e2e']:.2f}× "
              "lower (target: ≥ 2.7×)."]
    return "\n".join(lines) + "\n"


def sweep(args, settings, seeds: dict[str, list[int]], first: tuple[str, ...], threads: int):
    """Every (setting, seed) through run_one in a pool of args.jobs processes, the `first`
    settings first; returns the reports by setting and a record of the machine and load."""
    load_before = os.getloadavg()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        order = sorted(settings, key=lambda s: s[0] not in first)
        futures = {(name, seed): pool.submit(run_one, args.preset, name, overrides, seed, str(args.out), threads,
                                             args.set)
                   for name, overrides in order for seed in seeds[name]}
        results = {name: [futures[(name, seed)].result() for seed in seeds[name]] for name, _ in settings}
    reports = [r for runs in results.values() for r in runs]
    executed = sum(not r.pop("reused", False) for r in reports)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "jobs": args.jobs,
               "runs_executed_now": executed, "runs_reused": len(reports) - executed,
               "torch_threads_per_run": sorted({r["threads"] for r in reports}),
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "backend": reports[0]["backend"], "torch": reports[0]["torch"]}
    return results, machine


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every sweep tool shares: parallel runs, threads, a subset, overrides."""
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one torch thread each if > 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run; 0 = 1 if jobs > 1")
    parser.add_argument("--only", nargs="+", help="settings to run (default: all)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m diffusionblocks.tools.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit-digits")
    parser.add_argument("--out", default="results/digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_sweep_arguments(parser)
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.jobs > 1 else 0)
    settings = [s for s in SETTINGS if not args.only or s[0] in args.only]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # The headline pair (e2e, B=3) first, so a sweep cut short still answers the main question.
    results, machine = sweep(args, settings, {name: args.seeds for name, _ in settings},
                             ("e2e", "blocks B=3"), threads)
    executed, load_before = machine["runs_executed_now"], machine["load_average_before"]
    (Path(args.out) / "results.json").write_text(json.dumps({"machine": machine, "preset": args.preset,
                                                             "overrides": args.set, "runs": results}, indent=2) + "\n")
    if all(name in results for name, _ in SETTINGS):
        header = (f"Preset `{args.preset}` {' '.join(args.set)}, seeds {args.seeds}; {machine['cpus']} CPUs, "
                  f"torch threads per run {machine['torch_threads_per_run']}, backend {machine['backend']}, "
                  f"torch {machine['torch']}. This invocation ran {executed} run(s), {args.jobs} at a time, and "
                  f"reused {machine['runs_reused']} finished earlier; load average before/after "
                  f"{load_before[0]:.1f}/{machine['load_average_after'][0]:.1f}.")
        rows = summarize(results)
        table = markdown(rows, header)
        (Path(args.out) / "table.md").write_text(table)
        (Path(args.out) / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(table)


if __name__ == "__main__":
    main()
