"""Does a finished torchrun job exit 0 every time? Runs ``clean_exit_worker.py``'s jobs repeatedly and counts.

    .venv/bin/python benchmarks/bench_clean_exit.py --runs 50 --json docs/data/clean_exit.json

Each run is ``python -m torch.distributed.run --standalone --nproc_per_node 2 clean_exit_worker.py --job J``.
A run is clean when torchrun exits 0 and nothing printed ``terminate called`` (the C++ runtime aborting a
process after its results were printed). Also reported, medians over the runs' ranks: the RSS growth of the
first step and after it, the first step's time against the later steps', and whether the first step loaded
``torch._dynamo`` (docs/reliability.md, "A finished run exits 0").
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

WORKER = pathlib.Path(__file__).with_name("clean_exit_worker.py")
JOBS = ("layer", "functional", "c10d")


def run_once(job: str, nproc: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), "--job", job, "--out", folder]
        start = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(job=job, returncode=None, clean=False, aborted=False, hung=True, ranks=[], seconds=timeout)
        ranks = [json.loads(path.read_text()) for path in sorted(pathlib.Path(folder).glob("rank*.json"))]
    text = out.stdout + out.stderr
    aborted = "terminate called" in text
    return dict(job=job, returncode=out.returncode, clean=out.returncode == 0 and not aborted, aborted=aborted,
                hung=False, ranks=ranks, seconds=round(time.perf_counter() - start, 2),
                tail=None if out.returncode == 0 and not aborted else text[-1500:])


def summarize(job: str, runs: list[dict]) -> dict:
    ranks = [r for run in runs for r in run["ranks"]]

    def median(key):
        values = [r[key] for r in ranks]
        return round(statistics.median(values), 2) if values else None
    first_growth = [r["rss_after_first_step_mib"] - r["rss_setup_mib"] for r in ranks]
    return dict(job=job, runs=len(runs), clean=sum(r["clean"] for r in runs),
                aborted=sum(r["aborted"] for r in runs), hung=sum(r["hung"] for r in runs),
                other_failures=sum(not r["clean"] and not r["aborted"] and not r["hung"] for r in runs),
                rss_first_step_growth_mib=round(statistics.median(first_growth), 1) if first_growth else None,
                rss_end_mib=median("rss_end_mib"), first_step_ms=median("first_step_ms"),
                later_step_ms=median("later_step_ms"),
                modules_imported_by_first_step=median("modules_imported_by_first_step"),
                dynamo_loaded=any(r["dynamo_loaded"] for r in ranks))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=50, help="runs per job (default 50)")
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    p.add_argument("--nproc", type=int, default=2, help="processes per run (default 2)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a run counts as hung")
    p.add_argument("--json", type=pathlib.Path, help="write the summaries and every failed run's output here")
    args = p.parse_args(argv)
    if args.runs < 1 or args.nproc < 2:
        p.error("--runs must be >= 1 and --nproc >= 2")
    summaries, failures = [], []
    for job in args.jobs:
        runs = [run_once(job, args.nproc, args.timeout) for _ in range(args.runs)]
        failures += [r for r in runs if not r["clean"]]
        summaries.append(summarize(job, runs))
    header = ("job", "runs", "clean", "aborted", "hung", "other_failures", "rss_first_step_growth_mib",
              "rss_end_mib", "first_step_ms", "later_step_ms", "modules_imported_by_first_step", "dynamo_loaded")
    print(" | ".join(header))
    for s in summaries:
        print(" | ".join(str(s[k]) for k in header))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(summaries=summaries, failures=failures), indent=1) + "\n")


if __name__ == "__main__":
    main()
