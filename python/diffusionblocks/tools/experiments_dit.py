"""The DiT comparison: end-to-end against block-wise DiT (B = 3) on digits at
the same layer-evaluation budget, the partition ablation (equi-probability vs uniform in
ln σ at γ = 0) and the overlap ablation (γ = 0, 0.05, 0.1), then, on the headline pair
(e2e, B=3 γ=0.05), the sampling cost (layer evaluations counted, wall clock timed
interleaved in one process) and a sampler/guidance grid. Writes OUT/results.json and
OUT/table.md.

    python -m diffusionblocks.tools.experiments_dit --out results/dit-digits --seeds 0

Every run scores its samples with one evaluator (trained once into OUT/evaluator.safetensors
and copied into each run directory, where the task finds and reuses it), so Fréchet
distances are comparable across rows. Finished runs (a report.json) are reused."""

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from ..tasks import evaluator
from ..tasks.data import digits
from ..tasks.dit import EVAL_SEED
from .experiments import mean_std, slug, sweep

PRESET = "dit-digits"
HEADLINE = ("e2e", "blocks B=3")
SETTINGS = [
    ("e2e", {"mode": "e2e"}),
    ("blocks B=3", {}),
    ("blocks B=3 γ=0", {"gamma": 0.0}),
    ("blocks B=3 uniform γ=0", {"partition": "uniform", "gamma": 0.0}),
    ("blocks B=3 γ=0.1", {"gamma": 0.1}),
]
# (sampler, N, cfg, levels) scored on the headline pair; Heun with N = 25 makes 49 network
# evaluations, about as many as Euler's 50.
GRID = [("euler", 50, 1.0, "cdf"), ("euler", 50, 1.5, "cdf"), ("euler", 50, 2.0, "cdf"), ("heun", 25, 1.0, "cdf"),
        ("euler", 50, 1.0, "karras"), ("heun", 25, 1.0, "karras"), ("euler", 10, 1.0, "cdf")]
TIMING_IMAGES_PER_CLASS = 10
TIMING_REPEATS = 5


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / slug(name) / f"seed{seed}"


def seed_evaluator(out: Path, runs: list[Path]) -> None:
    """One evaluator for the whole sweep, placed in every run directory before it trains."""
    shared = out / evaluator.FILENAME
    evaluator.load_or_train(out, digits.load())
    for directory in runs:
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / evaluator.FILENAME).exists():
            shutil.copyfile(shared, directory / evaluator.FILENAME)


def score(trainer, method: str, steps: int, cfg: float, levels: str, judge) -> dict:
    """Class consistency and Fréchet distance of the run's eval_samples images, made with
    the given sampler, N, guidance scale and levels (same seed as the run's own evaluation)."""
    task = trainer.task
    labels = task.class_labels(task.options.eval_samples // task.num_classes)
    images, cost = task.generate(trainer.plan, labels, steps, method, cfg, torch.Generator().manual_seed(EVAL_SEED),
                                 levels)
    real = evaluator.features(judge, task.data.pixels(task.data.test_images))
    return {"sampler": method, "steps": steps, "cfg": cfg, "levels": levels,
            "class_consistency": evaluator.accuracy(judge, images, labels),
            "frechet_distance": evaluator.frechet_distance(evaluator.features(judge, images), real),
            "network_evals": cost["network_evals"], "layer_evals_per_image": cost["layer_evals_per_image"]}


def sampling_cost(trainers: dict, cfg: float, steps: int) -> dict:
    """Layer evaluations counted by forward hooks on model.layers, and the wall clock of one
    batch (TIMING_IMAGES_PER_CLASS per class), the two modes timed alternately, median of
    TIMING_REPEATS after one warm-up each."""
    counted, times = {}, {name: [] for name in trainers}
    for name, trainer in trainers.items():
        calls = []
        hooks = [layer.register_forward_pre_hook(lambda m, a: calls.append(1)) for layer in trainer.model.layers]
        task = trainer.task
        labels = task.class_labels(TIMING_IMAGES_PER_CLASS)
        task.generate(trainer.plan, labels, steps, "euler", cfg, torch.Generator().manual_seed(0))
        for hook in hooks:
            hook.remove()
        counted[name] = len(calls)
    for _ in range(TIMING_REPEATS):
        for name, trainer in trainers.items():
            labels = trainer.task.class_labels(TIMING_IMAGES_PER_CLASS)
            started = time.perf_counter()
            trainer.task.generate(trainer.plan, labels, steps, "euler", cfg, torch.Generator().manual_seed(0))
            times[name].append(time.perf_counter() - started)
    e2e, blocks = HEADLINE
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"steps": steps, "cfg": cfg, "images": TIMING_IMAGES_PER_CLASS * 10, "layer_calls": counted,
            "layer_call_ratio": counted[e2e] / counted[blocks], "seconds_median": median,
            "seconds_all": times, "wall_clock_ratio": median[e2e] / median[blocks],
            "threads": torch.get_num_threads()}


def headline_analysis(out: Path, seeds: list[int]) -> dict:
    from ..cli import trained

    judge, _ = evaluator.load_or_train(out, digits.load())
    per_seed = {}
    for seed in seeds:
        trainers = {name: trained(run_dir(out, name, seed)) for name in HEADLINE}
        for trainer in trainers.values():
            trainer.model.eval()
        cfg = trainers[HEADLINE[1]].task.options.cfg_scale
        per_seed[seed] = {
            "cost": sampling_cost(trainers, cfg, trainers[HEADLINE[1]].task.options.sample_steps),
            "grid": {name: [score(trainer, method, steps, scale, levels, judge) for method, steps, scale, levels in GRID]
                     for name, trainer in trainers.items()},
        }
    return per_seed


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, _ in SETTINGS:
        reports = results[name]
        metric = lambda key: mean_std([r["metrics"][key] for r in reports])  # noqa: E731
        first = reports[0]
        rows.append({
            "setting": name, "blocks": first["blocks"], "partition": first["partition"], "gamma": first["gamma"],
            "seeds": [r["seed"] for r in reports],
            "class_consistency": metric("class_consistency"), "frechet_distance": metric("frechet_distance"),
            "test_denoising_loss": metric("test_denoising_loss"),
            "per_seed": [{"seed": r["seed"], "class_consistency": r["metrics"]["class_consistency"],
                          "frechet_distance": r["metrics"]["frechet_distance"]} for r in reports],
            "train_layer_evals": statistics.mean(r["layer_evals"] for r in reports), "steps": first["steps"],
            "sampling_layer_evals_per_image": first["metrics"]["sampling_layer_evals_per_image"],
            "sampling_seconds": statistics.mean(r["metrics"]["sampling_seconds"] for r in reports),
            "wall_s_mean": statistics.mean(r["wall_s"] for r in reports),
            "activation_bytes_per_step": first["memory"]["activation_bytes_per_step"],
        })
    return rows


def markdown(rows: list[dict], headline: dict, header: str) -> str:
    mib = 1 / 2**20
    lines = [header, "",
             "| setting | B | partition | γ | class consistency % | Fréchet distance | test denoising loss "
             "| steps | train layer evals | sampling layer evals / image | train wall s | activations MiB/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cc, fd, tl = r["class_consistency"], r["frechet_distance"], r["test_denoising_loss"]
        lines.append(
            f"| {r['setting']} | {r['blocks']} | {r['partition'] or '–'} | {'–' if r['gamma'] is None else r['gamma']} "
            f"| {100 * cc[0]:.1f} ± {100 * cc[1]:.1f} | {fd[0]:.2f} ± {fd[1]:.2f} | {tl[0]:.4f} ± {tl[1]:.4f} "
            f"| {r['steps']} | {r['train_layer_evals']:.0f} | {r['sampling_layer_evals_per_image']} "
            f"| {r['wall_s_mean']:.0f} | {r['activation_bytes_per_step'] * mib:.2f} |")
    by_name = {r["setting"]: r for r in rows}
    e2e, blocks = by_name[HEADLINE[0]], by_name[HEADLINE[1]]
    lines += ["", f"Block-wise B=3 γ=0.05: class consistency {100 * blocks['class_consistency'][0]:.1f}% "
              f"(target ≥ 90%); Fréchet distance {blocks['frechet_distance'][0]:.2f} = "
              f"{blocks['frechet_distance'][0] / e2e['frechet_distance'][0]:.2f} × end-to-end's "
              f"{e2e['frechet_distance'][0]:.2f} (target ≤ 1.1×)."]
    for seed, result in headline.items():
        cost = result["cost"]
        lines += ["", f"Seed {seed}, sampling {cost['images']} images, N = {cost['steps']} Euler, cfg {cost['cfg']:g}, "
                  f"{cost['threads']} thread(s): layer calls counted e2e {cost['layer_calls'][HEADLINE[0]]} vs "
                  f"block-wise {cost['layer_calls'][HEADLINE[1]]} ({cost['layer_call_ratio']:.2f}× fewer); "
                  f"wall clock (median of {TIMING_REPEATS}, interleaved) {cost['seconds_median'][HEADLINE[0]]:.3f} s "
                  f"vs {cost['seconds_median'][HEADLINE[1]]:.3f} s ({cost['wall_clock_ratio']:.2f}× faster).",
                  "", "| sampler | N | cfg | levels | network evals | " +
                  " | ".join(f"{name}: class cons. % | {name}: Fréchet" for name in HEADLINE) + " |",
                  "|---|---|---|---|---|" + "---|---|" * len(HEADLINE)]
        for i, (method, steps, cfg, levels) in enumerate(GRID):
            cells = " | ".join(f"{100 * result['grid'][name][i]['class_consistency']:.1f} | "
                               f"{result['grid'][name][i]['frechet_distance']:.2f}" for name in HEADLINE)
            lines.append(f"| {method} | {steps} | {cfg:g} | {levels} | {result['grid'][HEADLINE[0]][i]['network_evals']} "
                         f"| {cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m diffusionblocks.tools.experiments_dit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=PRESET)
    parser.add_argument("--out", default="results/dit-digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--headline-seeds", type=int, nargs="*", default=[],
                        help="further seeds for the headline pair (e2e, blocks B=3) only")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one torch thread each if > 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run; 0 = 1 if jobs > 1")
    parser.add_argument("--only", nargs="+", help="settings to run (default: all)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.jobs > 1 else 0)
    if threads:
        torch.set_num_threads(threads)
    out = Path(args.out)
    settings = [s for s in SETTINGS if not args.only or s[0] in args.only]
    seeds = {name: args.seeds + ([s for s in args.headline_seeds if s not in args.seeds] if name in HEADLINE else [])
             for name, _ in settings}
    seed_evaluator(out, [run_dir(out, name, seed) for name, _ in settings for seed in seeds[name]])
    from .. import train  # noqa: F401  (imported before the workers fork: one code version for the sweep)

    results, machine = sweep(args, settings, seeds, HEADLINE, threads)  # the headline pair first
    executed, load_before = machine["runs_executed_now"], machine["load_average_before"]
    payload = {"machine": machine, "preset": args.preset, "overrides": args.set, "runs": results}
    if all(name in results for name in HEADLINE):
        payload["headline"] = headline_analysis(out, seeds[HEADLINE[1]])
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    if all(name in results for name, _ in SETTINGS):
        header = (f"Preset `{args.preset}` {' '.join(args.set)}, seeds {args.seeds} (headline pair: "
                  f"{seeds[HEADLINE[1]]}); {machine['cpus']} CPUs, "
                  f"torch threads per run {machine['torch_threads_per_run']}, backend {machine['backend']}, "
                  f"torch {machine['torch']}. This invocation ran {executed} run(s), {args.jobs} at a time, and "
                  f"reused {machine['runs_reused']}; load average before/after "
                  f"{load_before[0]:.1f}/{machine['load_average_after'][0]:.1f} (a shared machine: wall times "
                  f"are inflated by other jobs).")
        rows = summarize(results)
        table = markdown(rows, payload["headline"], header)
        (out / "table.md").write_text(table)
        (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(table)


if __name__ == "__main__":
    main()
