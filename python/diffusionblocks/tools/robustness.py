"""Robustness of the ops, measured: the bad-input matrix and a fuzz sweep of op_cases.py,
per op and per path, each case in a worker subprocess so that a crash or a hang is counted
instead of ending the run. Prints the table of outcomes (op_cases.py defines them).

    python -m diffusionblocks.tools.robustness --out robustness.json [--fuzz 100] [--seed 0]
"""

import argparse
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time

import torch

from diffusionblocks_ext import ops

from .op_cases import ALL_PATHS, OPS, OUTCOMES, RandomPick, available_paths, fuzz_case, matrix, run


def _cases(kind, count, seed):
    if kind == "matrix":
        return [c for c in matrix() if torch.cuda.is_available() or not c.needs_cuda]
    pick = RandomPick(seed)
    return [fuzz_case(op, pick, i) for i in range(count) for op in OPS]


def _worker(kind, path, count, seed, start):
    """Runs cases[start:] on `path`, one JSON line per case; 'start' lines let the parent
    name the case that was running when the process died."""
    cases = [c for c in _cases(kind, count, seed) if path in c.paths]
    crash = os.environ.get("DBX_ROBUSTNESS_CRASH")  # a case id to die on: tests the crash accounting
    for index in range(start, len(cases)):
        print(json.dumps({"start": index}), flush=True)
        if cases[index].id == crash:
            os.abort()
        outcome = run(cases[index], path)
        print(json.dumps({"done": index, "op": cases[index].op, "case": cases[index].name, "kind": outcome.kind,
                          "detail": outcome.detail}), flush=True)


def _supervise(kind, path, count, seed, timeout):
    """Runs the worker for (kind, path), restarting it after a crash or a hang; returns the
    outcome of every case."""
    cases = [c for c in _cases(kind, count, seed) if path in c.paths]
    # Run from the directory holding this package, so `-m` imports the same copy (not, say,
    # a source checkout without a compiled _C in the current directory).
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results, start = [], 0
    while start < len(cases):
        command = [sys.executable, "-m", "diffusionblocks.tools.robustness", "--worker", kind, path,
                   "--fuzz", str(count), "--seed", str(seed), "--start", str(start)]
        with tempfile.TemporaryFile("w+") as stderr:  # a file: a full pipe would stall the worker
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=here)
            selector = selectors.DefaultSelector()
            selector.register(process.stdout, selectors.EVENT_READ)
            running, hung = None, False
            while True:
                if not selector.select(timeout):
                    hung = True
                    process.kill()
                    break
                line = process.stdout.readline()
                if not line:
                    break
                if not line.startswith("{"):  # anything else printed on stdout
                    continue
                message = json.loads(line)
                if "start" in message:
                    running = message["start"]
                else:
                    results.append(message)
                    running = None
            process.wait()
            if running is None and len(results) >= len(cases):
                break
            stderr.seek(0)
            reason = "hung" if hung else f"exit status {process.returncode}: {stderr.read()[-300:].strip()}"
        index = running if running is not None else len(results)
        results.append({"done": index, "op": cases[index].op, "case": cases[index].name, "kind": "crash",
                        "detail": reason})
        start = index + 1
    return results


# The dispatcher-only ops are counted with the public op they serve.
PUBLIC_OP = {"sample_sigma_": "sample_sigma", "edm_loss_backward": "edm_loss",
             "weighted_cross_entropy_backward": "weighted_cross_entropy"}


def summarize(records):
    """{(op, path): counts of matrix and fuzz inputs and of each outcome}, in OPS order."""
    rows = {}
    for r in records:
        row = rows.setdefault((PUBLIC_OP.get(r["op"], r["op"]), r["path"]), dict.fromkeys(("matrix", "fuzz") + OUTCOMES, 0))
        row[r["input"]] += 1
        row[r["kind"]] += 1
    return {(op, path): rows[(op, path)] for op in OPS for path in ALL_PATHS if (op, path) in rows}


def table(rows):
    lines = ["| op | path | bad-input matrix | fuzz | correct | clear errors | unclear errors | crashes | silently wrong |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    columns = ("matrix", "fuzz", "correct", "error", "bad_error", "crash", "wrong")
    for (op, path), row in rows.items():
        lines.append(f"| {op} | {path} | " + " | ".join(str(row[c]) for c in columns) + " |")
    totals = [sum(row[c] for row in rows.values()) for c in columns]
    lines.append("| **all** | | " + " | ".join(f"**{t}**" for t in totals) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write every outcome and the summary here (JSON)")
    parser.add_argument("--fuzz", type=int, default=100, help="fuzz inputs per op and path (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fuzz sweep")
    parser.add_argument("--timeout", type=float, default=120, help="seconds one case may run before it counts as hung")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], args.worker[1], args.fuzz, args.seed, args.start)
        return 0
    started = time.time()
    records = []
    for kind in ("matrix", "fuzz"):
        for path in available_paths():
            for record in _supervise(kind, path, args.fuzz, args.seed, args.timeout):
                records.append(dict(record, input=kind, path=path))
    rows = summarize(records)
    print(table(rows))
    failures = [r for r in records if r["kind"] in ("bad_error", "wrong", "crash")]
    for r in failures:
        print(f"- {r['path']} {r['op']}: {r['case']}: {r['kind']}: {r['detail']}")
    info = dict(torch=torch.__version__, extension=ops.HAS_EXT, paths=available_paths(), fuzz_per_op=args.fuzz,
                seed=args.seed, seconds=round(time.time() - started, 1), machine=os.uname().machine,
                cpus=os.cpu_count())
    print(f"\n{len(records)} inputs in {info['seconds']} s; {len(failures)} not correct or a clear error")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(info=info, table=table(rows), summary=[dict(op=op, path=path, **row) for (op, path), row
                                                                  in rows.items()], records=records), f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
