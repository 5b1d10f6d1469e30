"""The language-model comparison: end-to-end against block-wise for the autoregressive
(`ar-text`) and recurrent-depth (`recurrent-text`) character LMs, several seeds each at
the same layer-evaluation budget, with one-seed ablations of the block-wise recipe and a
capacity reference. Writes OUT/results.json (every run's report), OUT/summary.json and
OUT/table.md.

    python -m diffusionblocks.tools.experiments_text --preset ar-text --out results/ar-text --jobs 2

Every run judges its generations with the same evaluator LM (trained once on the training
split and cached, tasks/text_quality.py), so MAUVE compares across rows. Finished runs (a
report.json) are reused, so an interrupted sweep continues where it stopped."""

import argparse
import json
import statistics
from pathlib import Path

from .experiments import add_sweep_arguments, mean_std, slug, sweep

# (name, overrides, headline): headline rows run every seed, the others the first one.
SETTINGS = {
    "ar-text": [
        ("e2e", {"mode": "e2e"}, True),
        ("blocks", {}, True),
        # What one block's depth reaches end to end: the chain's predictive distribution comes
        # from its noisiest block (the per-block table shows it), 2 of the 8 layers.
        ("e2e, 2 layers", {"mode": "e2e", "model.layers": 2}, False),
        # The recipe as the paper states it, each of the two changes undone alone, and the
        # input that reads z as evidence (charlm.evidence).
        ("blocks, paper's recipe", {"model.target_norm": 1.0, "model.noisy_input": "c_in",
                                    "model.previous_char": False}, False),
        ("blocks, target norm 1", {"model.target_norm": 1.0}, False),
        ("blocks, evidence input", {"model.noisy_input": "evidence"}, False),
        ("blocks, no previous char", {"model.previous_char": False}, False),
        ("blocks, 5+1+1+1 layers", {"split": (5, 1, 1, 1)}, False),
        ("blocks, tied embedding", {"model.tied_target_embedding": True}, False),  # one table, as the paper words it
        # The head models p(y | context) and Bayes' rule adds z's likelihood (charlm.READOUTS).
        ("blocks, posterior readout", {"model.readout": "posterior"}, False),
        # ... and each block at the middle of its own interval, none at σ_min (schedule.midpoint_sigmas).
        ("blocks, posterior readout, midpoint levels", {"model.readout": "posterior",
                                                        "model.inference_schedule": "midpoint"}, False),
        # 4 layers a block (half the memory saving). Its chain needs levels between σ_max and
        # σ_min to draw a sample: with N = B = 2 the Euler step from σ_max lands on the
        # expected target and the last level returns its nearest character, greedy decoding.
        ("blocks B=2, N=4 levels", {"blocks": 2, "model.inference_steps": 4}, False),
        # Twice the budget in both modes: does the gap close as the models train longer?
        ("e2e, 1,000 steps", {"mode": "e2e", "e2e_steps": 1000}, False),
        ("blocks, 1,000 e2e steps", {"e2e_steps": 1000}, False),
    ],
    "recurrent-text": [
        ("e2e (Huginn)", {"mode": "e2e"}, True),
        ("blocks", {}, True),
        # Each pass once in the middle of its interval, none at σ_min (schedule.midpoint_sigmas):
        # inference only, so it trains the weights of "blocks" again; more seeds with --seeds N.
        ("blocks, midpoint levels", {"model.inference_schedule": "midpoint"}, False),
        # The readout before the posterior one: the head's logits alone.
        ("blocks, head readout", {"model.readout": "head"}, False),
        # The budget before it counted the baseline's K core passes: a quarter of its compute.
        ("blocks, 600 steps (1/4 of the compute)", {"steps": 600}, False),
    ],
}


def pooled(reports: list[dict], pick) -> tuple[float, float] | None:
    """Mean ± std of the values pick(report) returns (a number or a list), over all reports."""
    values = []
    for report in reports:
        value = pick(report)
        if value is None:
            return None
        values += value if isinstance(value, list) else [value]
    return mean_std(values)


def decoding(report: dict, name: str) -> dict | None:
    return report["metrics"].get("generation", {}).get("by_decoding", {}).get(name)


def summarize(results: dict[str, list[dict]], settings) -> list[dict]:
    rows = []
    for name, _, _ in settings:
        reports = results[name]
        first = reports[0]
        metric = lambda key: pooled(reports, lambda r: r["metrics"].get(key))  # noqa: E731
        row = {"setting": name, "mode": first["mode"], "seeds": [r["seed"] for r in reports],
               "brier": metric("test_brier"), "sample_accuracy": metric("test_sample_accuracy"),
               "argmax_accuracy": metric("test_accuracy") if first["mode"] == "e2e" else None,
               "layer_evals": first["layer_evals"], "wall_s": statistics.mean(r["wall_s"] for r in reports),
               "by_K": {}, "mauve": {}}
        for key in sorted(first["metrics"]):
            if key.startswith("test_brier_K"):
                row["by_K"][int(key.removeprefix("test_brier_K"))] = metric(key)
        names = ("greedy",) if first["mode"] == "blocks" else ("ancestral", "top-p", "greedy")
        for decoded in names:
            if decoding(first, decoded) is None:
                continue
            row["mauve"][decoded] = {
                "mauve": pooled(reports, lambda r: decoding(r, decoded)["mauve_by_seed"]),
                **{k: pooled(reports, lambda r: decoding(r, decoded)[k])
                   for k in ("evaluator_bpc", "distinct4", "unigram_entropy_bits")}}
        if "generation" in first["metrics"]:
            row["reference"] = first["metrics"]["generation"]["reference"]
        if "block_table" in first["metrics"]:
            row["block_table"] = first["metrics"]["block_table"]
        rows.append(row)
    return rows


def cell(pair, digits=3) -> str:
    return "–" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def markdown(rows: list[dict], header: str) -> str:
    ks = sorted({k for r in rows for k in r["by_K"]})
    lines = [header, "", "Teacher-forced next-character prediction on the held-out windows (mean ± std over seeds):", "",
             "| setting | seeds | Brier | sample acc. | argmax acc. | " + "".join(f"Brier K={k} | " for k in ks)
             + "train layer evals | wall s |",
             "|---|---|---|---|---|" + "---|" * len(ks) + "---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {len(r['seeds'])} | {cell(r['brier'])} | {cell(r['sample_accuracy'])} | "
                     f"{cell(r['argmax_accuracy'])} | " + "".join(f"{cell(r['by_K'].get(k))} | " for k in ks)
                     + f"{r['layer_evals']} | {r['wall_s']:.0f} |")
    lines += ["", "Continuations of held-out prompts judged by the evaluator LM (MAUVE mean ± std over training, "
              "sampling and clustering seeds; the others mean ± std over runs):", "",
              "| setting | decoding | MAUVE | evaluator bits/char | distinct-4 | unigram entropy (bits) |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        for decoded, m in r["mauve"].items():
            label = "chain (greedy readout)" if r["mode"] == "blocks" else decoded
            lines.append(f"| {r['setting']} | {label} | {cell(m['mauve'])} | {cell(m['evaluator_bpc'])} | "
                         f"{cell(m['distinct4'])} | {cell(m['unigram_entropy_bits'], 2)} |")
    reference = next((r["reference"] for r in rows if "reference" in r), None)
    if reference:
        lines.append(f"| true continuations, half against half | – | "
                     f"{reference['mauve_mean']:.3f} ± {reference['mauve_std']:.3f} | {reference['evaluator_bpc']:.3f} | "
                     f"{reference['distinct4']:.3f} | {reference['unigram_entropy_bits']:.2f} |")
    for r in rows:
        if "block_table" not in r:
            continue
        lines += ["", f"Per level of the chain, `{r['setting']}` (seed {r['seeds'][0]}): the block's accuracy given "
                  "the true next character noised to the level's σ, against what its input alone tells:", "",
                  "| σ | block | accuracy | Brier | z alone (nearest target) | previous level × z |", "|---|---|---|---|---|---|"]
        for level in r["block_table"]:
            lines.append(f"| {level['sigma']:.3g} | {level['block']} | {level['accuracy']:.3f} | {level['brier']:.3f} | "
                         f"{level['z_alone_accuracy']:.3f} | {level['previous_and_z_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def mauve_by_recurrence(results: dict[str, list[dict]], settings, out: Path) -> dict:
    """Recurrent task: MAUVE of the like-for-like decoding at every K of the headline runs'
    eval_recurrences, for every seed (one sampling seed each: generation costs K passes a
    character), from their checkpoints. Cached in OUT/mauve_by_K.json as
    {setting: {seed: {K: MAUVE}}}."""
    from ..cli import trained

    path = out / "mauve_by_K.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    for name, _, headline in settings:
        if not headline:
            continue
        by_seed = cached.setdefault(name, {})
        for report in results[name]:
            if str(report["seed"]) in by_seed:
                continue
            trainer = trained(out / slug(name) / f"seed{report['seed']}")
            task, mode = trainer.task, trainer.config.mode
            task.model.eval()
            by_seed[str(report["seed"])] = {
                str(k): task.generation_report(trainer.plan, mode, steps=k, decodings=task.decodings(mode)[:1],
                                               sampling_seeds=(0,))["mauve"]
                for k in task.options.eval_recurrences}
            path.write_text(json.dumps(cached, indent=2) + "\n")
    return cached


def mauve_by_recurrence_table(by_k: dict) -> str:
    ks = sorted({int(k) for by_seed in by_k.values() for runs in by_seed.values() for k in runs})
    seeds = sorted({seed for by_seed in by_k.values() for seed in by_seed}, key=int)
    lines = [f"MAUVE at each number of core passes K (mean ± std over seeds {', '.join(seeds)}; each seed one "
             "sampling seed × 3 clustering seeds):", "",
             "| setting | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for name, by_seed in by_k.items():
        lines.append(f"| {name} | " + " | ".join(
            cell(mean_std([runs[str(k)] for runs in by_seed.values()])) for k in ks) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m diffusionblocks.tools.experiments_text", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ar-text", choices=sorted(SETTINGS))
    parser.add_argument("--out", default=None, help="default: results/PRESET")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mauve-per-k", action="store_true",
                        help="recurrent task: also MAUVE at every K of the headline runs (slow: K passes a character)")
    add_sweep_arguments(parser)
    args = parser.parse_args(argv)
    args.out = Path(args.out or f"results/{args.preset}")
    threads = args.threads or (1 if args.jobs > 1 else 0)
    settings = [s for s in SETTINGS[args.preset] if not args.only or s[0] in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = {name: args.seeds if headline else args.seeds[:1] for name, _, headline in settings}
    headline = tuple(name for name, _, is_headline in settings if is_headline)
    results, machine = sweep(args, [(name, overrides) for name, overrides, _ in settings], seeds, headline, threads)
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "preset": args.preset,
                                                       "overrides": args.set, "runs": results}, indent=2) + "\n")
    header = (f"Preset `{args.preset}` {' '.join(args.set)}; {machine['cpus']} CPUs, torch threads per run "
              f"{machine['torch_threads_per_run']}, backend {machine['backend']}, torch {machine['torch']}; "
              f"{machine['runs_executed_now']} run(s) now, {args.jobs} at a time, {machine['runs_reused']} reused.")
    scored_with = {json.dumps(r["metrics"]["generation"]["measured_with"], sort_keys=True)
                   for reports in results.values() for r in reports
                   if "measured_with" in r["metrics"].get("generation", {})}
    for provenance in map(json.loads, sorted(scored_with)):  # more than one: MAUVE compares within each only
        packages = ", ".join(f"{name} {version}" for name, version in provenance["packages"].items())
        header += f" MAUVE scored by evaluator {provenance['evaluator_weights']} with {packages}."
    rows = summarize(results, settings)
    table = markdown(rows, header)
    if args.mauve_per_k:
        table += "\n" + mauve_by_recurrence_table(mauve_by_recurrence(results, settings, args.out))
    (args.out / "table.md").write_text(table)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
