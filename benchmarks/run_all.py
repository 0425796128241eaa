"""Every benchmark in one run (``make bench``): their tables on stdout, their figures in one results.json, the plots.

    .venv/bin/python benchmarks/run_all.py [--out bench-results] [--quick] [--only NAME ...]

Runs, one after the other, each as its own process (so one's memory and threads do not disturb the next):

- ``benchmarks/objectives.py``: each objective's step time against clip, the bytes of its state, FastCLIP's u-table
  bytes per sample;
- ``benchmarks/loader.py``: clipline's loader against open_clip_train's ``get_wds_dataset``, samples/s per worker;
- ``benchmarks/trainer.py --json``: clipline's trainer against open_clip_train (samples/s), and CLIPA stage 1's step
  speed-up over full tokens;
- ``benchmarks/quality.py --out --json``: zero-shot quality of clip, siglip, FastCLIP v3 and AmorLIP at global batch
  64 and 256 over 3 seeds, with ``accuracy_vs_samples.png``, and CLIPA's two stages and image masks against full
  tokens, with ``clipa.png``;
- ``benchmarks/parity.py --json``: clipline's clip against open_clip_train on the same raw shards, model and
  hyperparameters, 3 seeds each, every held-out metric's difference with its standard error, and the ablations.

Their output is shown as it comes (less img2dataset's progress lines) and kept in ``<out>/<name>.log``.
``<out>/results.json`` holds, per benchmark, its
exit code, wall seconds, peak memory (the largest resident set of its process tree, from ``wait4``'s ``ru_maxrss``)
and its figures: the JSON of the scripts that write one (``--json``), otherwise the figures parsed from its tables.
Temporary files go to a directory of their own (``TMPDIR``), removed at the end. ``--quick`` runs every benchmark
with a few seconds' settings (a smoke test of the whole chain, not figures to report). Exit code 1 when a benchmark
failed; the others still run. Defaults take about 2 h 20 min on a 2-core CPU: 44 minutes for the
first four (one run: 2,652 s, 40 of them quality.py) and ~95 for parity.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results_md import render

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent

QUICK = {
    "objectives": ["--rounds", "2", "--steps", "2"],
    "loader": ["--per-source", "200", "--epochs", "1"],
    "trainer": ["--per-source", "300", "--epochs", "3", "--repeats", "1", "--clipa-model", "tiny",
                "--clipa-rounds", "2"],
    "quality": ["--per-source", "300", "--seeds", "1", "--samples", "2048", "--evals", "2"],
    "parity": ["--quick"],
}


def steps(out: Path, quick: bool) -> dict[str, list[str]]:
    """name -> command line (the JSON-writing scripts get their --json path)."""
    cmds = {
        "objectives": [str(BENCHMARKS / "objectives.py")],
        "loader": [str(BENCHMARKS / "loader.py")],
        "trainer": [str(BENCHMARKS / "trainer.py"), "--json", str(out / "trainer.json")],
        "quality": [str(BENCHMARKS / "quality.py"), "--out", str(out), "--json", str(out / "quality.json")],
        "parity": [str(BENCHMARKS / "parity.py"), "--json", str(out / "parity.json")],
    }
    return {name: [sys.executable, *cmd, *(QUICK[name] if quick else [])] for name, cmd in cmds.items()}


def run(name: str, cmd: list[str], log_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one benchmark, echoing its output; returns exit code, wall seconds, peak RSS and the output."""
    print(f"\n{'=' * 100}\n{name}: {' '.join(os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c for c in cmd)}"
          f"\n{'=' * 100}", flush=True)
    started = time.perf_counter()
    lines = []
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            if not NOISE.search(line):  # img2dataset's progress (loader.py) stays in the log only
                sys.stdout.write(line)
                sys.stdout.flush()
            log.write(line)
            lines.append(line.rstrip("\n"))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    print(f"[{name}: exit {proc.returncode}, {wall:.0f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MB]", flush=True)
    return {"command": cmd, "returncode": proc.returncode, "wall_s": round(wall, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "log": str(log_path), "lines": lines}


# ------------------------------------------------------------------------------------------- figures from tables

NOISE = re.compile(r"^(worker|total)\s+- success|\d+it \[|^Starting the downloading|^Sharding file|^File sharded|"
                   r"^Downloading starting now")
LOADER_RATE = re.compile(r"^(.+?)\s+([\d.]+) samples/s per worker "
                         r"\(([\d.]+) samples/s total; warm-up epoch ([\d.]+) s\)")
RATIO = re.compile(r"^ratio clipline / open_clip_train: ([\d.]+)x")
OBJECTIVE_ROW = re.compile(r"^(\S.*?)\s+([\d.]+)\s+([+-][\d.]+)%\s+([\d,]+)$")
TABLE_ROW = re.compile(r"^\s+(v\d): (\d+) B/sample, ([\d.]+) GB per node shared, ([\d.]+) GB if replicated per rank")


def parse_loader(lines: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"loaders": {}}
    for line in lines:
        if m := LOADER_RATE.match(line):
            out["loaders"][m.group(1).strip()] = {"samples_per_s_per_worker": float(m.group(2)),
                                                  "samples_per_s": float(m.group(3)),
                                                  "warmup_epoch_s": float(m.group(4))}
        elif m := RATIO.match(line):
            out["ratio"] = float(m.group(1))
        elif line.startswith(("ingest + preprocess", "  ingest images/s", "clipline resume")):
            out.setdefault("notes", []).append(line.strip())
    return out


def parse_objectives(lines: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"objectives": {}, "fastclip_tables_400M_8gpu": {}}
    for line in lines:
        if m := OBJECTIVE_ROW.match(line):
            out["objectives"][m.group(1)] = {"step_ms": float(m.group(2)), "vs_clip_pct": float(m.group(3)),
                                             "state_bytes_100k_samples": int(m.group(4).replace(",", ""))}
        elif m := TABLE_ROW.match(line):
            out["fastclip_tables_400M_8gpu"][m.group(1)] = {"bytes_per_sample": int(m.group(2)),
                                                            "node_shared_gb": float(m.group(3)),
                                                            "replicated_per_rank_gb": float(m.group(4))}
        elif line.startswith("torch "):
            out["setup"] = line
    return out


def figures(name: str, result: dict[str, Any], out: Path) -> Any:
    path = out / f"{name}.json"
    if name in ("trainer", "quality", "parity"):
        return json.loads(path.read_text()) if path.exists() else None
    return {"loader": parse_loader, "objectives": parse_objectives}[name](result["lines"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="results.json, logs and plots")
    parser.add_argument("--quick", action="store_true", help="seconds-long settings: a smoke test of the chain")
    parser.add_argument("--only", nargs="+", choices=list(QUICK), help="run these benchmarks only")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="clipline-bench-tmp-"))
    env = {**os.environ, "TMPDIR": str(tmp), "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "cpu_count": os.cpu_count(), "quick": args.quick, "benchmarks": {}}
    try:
        for name, cmd in steps(out, args.quick).items():
            if args.only and name not in args.only:
                continue
            result = run(name, cmd, out / f"{name}.log", env)
            try:
                result["figures"] = figures(name, result, out)
            except (OSError, ValueError) as exc:
                result["figures"] = None
                result["figures_error"] = str(exc)
            del result["lines"]
            results["benchmarks"][name] = result
            (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - started
    results["wall_s"] = round(total, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "RESULTS.md").write_text(render(results, "."))  # the README's section: benchmarks/results_md.py --readme

    print(f"\n{'=' * 100}\nsummary ({'quick settings: not figures to report' if args.quick else 'full settings'})")
    print(f"{'benchmark':<14}{'exit':>6}{'wall s':>10}{'peak RSS MB':>14}")
    for name, r in results["benchmarks"].items():
        print(f"{name:<14}{r['returncode']:>6}{r['wall_s']:>10.0f}{r['peak_rss_mb']:>14.0f}")
    pngs = sorted(str(p.relative_to(out)) for p in out.glob("*.png"))
    print(f"plots in {out}: {', '.join(pngs) or 'none'}; figures: {out / 'results.json'}; the README's section: "
          f"{out / 'RESULTS.md'}")
    print(f"total wall time {total / 60:.1f} min ({total:.0f} s) on {os.cpu_count()} CPUs")
    failed = [n for n, r in results["benchmarks"].items() if r["returncode"] != 0]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
