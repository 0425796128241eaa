"""The README's benchmark results, written from one ``make bench`` run's ``results.json``.

    .venv/bin/python benchmarks/results_md.py bench-results [--readme README.md --plots docs/bench]
    .venv/bin/python benchmarks/results_md.py --variants PART3.json ...
    .venv/bin/python benchmarks/results_md.py --ablation DEFAULTS.json ABLATION.json

``render`` turns the figures into Markdown; ``run_all.py`` writes it to ``<out>/RESULTS.md`` after every run. With
``--readme`` the text between the README's ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` markers is replaced
by it and the run's PNG plots are copied to ``--plots`` (committed, so the README shows them), which is how the
README's section is made: never by hand, so it always matches one recorded run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
METRICS = (("mean cls acc1", "mean_acc1"), ("animal_mnist acc1", "animal_mnist/acc1"),
           ("emoji t→i R@5", "t2i_r5"), ("emoji i→t R@5", "i2t_r5"))


def pct(pair: list[float] | tuple[float, float]) -> str:
    mean, std = pair
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def points(diff: float, se: float | None) -> str:
    """A difference of two fractions in percentage points, with '± SE' where there is one (None: one run a side)."""
    return f"{100 * diff:+.1f}" + ("" if se is None else f" ± {100 * se:.1f}")


def table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def bullets(lines: list[str]) -> list[str]:
    """quality.py's comparison lines: headings stay text, indented lines become list items."""
    return [f"- {line.strip()}" if line.startswith("  ") else line.strip() for line in lines]


def quality_section(q: dict[str, Any], plots: str) -> list[str]:
    chance = q["chance"]
    rows = [[label, *(pct(s[key]) for _, key in METRICS), f"{s['wall_s'][0]:.0f}", f"{s['tau'][0]:.3f}"]
            for label, s in q["summary"].items()]
    rows.append(["chance", *(f"{100 * chance[key]:.1f}" for _, key in METRICS), "", ""])
    out = [f"**Objectives at small batch.** The same tiny model (`benchmarks/quality.py`: ViT 2x64 at 32 px, text 2x64 "
           f"at 16 tokens) trained on the demo data's training split for {q['samples']:,} samples with each objective "
           f"at its recipe defaults (lr = {q['base_lr']:g} x batch / 256), {q['seeds']} seeds each; zero-shot on the "
           "held-out split (never trained on): mean ± std over the seeds, %.", "",
           *table(["objective, global batch", *(name for name, _ in METRICS), "train s", "final τ"], rows)]
    out += bullets(q["comparison"])
    out += ["", f"![accuracy vs samples seen]({plots}/accuracy_vs_samples.png)", ""]
    return out


def clipa_section(c: dict[str, Any], plots: str) -> list[str]:
    rows = [[label, *(pct(s[key]) for _, key in METRICS[:2]), f"{s['wall_s'][0]:.1f}", c["speedup"][label]]
            for label, s in c["summary"].items()]
    return [f"**CLIPA.** {c['objective']}, batch {c['batch']}, {c['samples']:,} samples, {c['seeds']} seed(s): full "
            f"tokens against stage 1 on {1 - c['finetune_share']:.0%} of the samples with 4 of the 16 image patches "
            "(resize to 16 px, or one of the masks at 32 px) and text cut to 8 tokens by the syntax mask, then a "
            f"full-token finetune on {c['finetune_share']:.0%}. Speed-up is in training wall time.", "",
            *table(["setting", *(name for name, _ in METRICS[:2]), "train s", "speed-up"], rows),
            f"![CLIPA vs full tokens]({plots}/clipa.png)", ""]


def parity_section(p: dict[str, Any]) -> list[str]:
    main = p["comparisons"]["clipline"]
    rows = [[r["metric"], pct(r["open_clip_train"]), pct(r["clipline"]),
             points(r["diff"], r["se"]) + (" **below**" if r["below"] else "")] for r in main]
    ablations = []
    for label, comparison in p["comparisons"].items():
        by_metric = {r["metric"]: r for r in comparison}
        ablations.append(["defaults" if label == "clipline" else label,
                          *(points(by_metric[m]["diff"], by_metric[m]["se"])
                            for m in ("mean_acc1", "mean_t2i_r10", "mean_i2t_r10")),
                          f"{sum(r['below'] for r in comparison)} of {len(comparison)}"])
    return [f"**Parity with open_clip_train.** `benchmarks/parity.py`: clipline's clip and open_clip_train on the same "
            f"raw shards ({p['samples']:,} training samples), same model and hyperparameters, {p['epochs']} epochs at "
            f"batch {p['batch']}, {p['seeds']} seeds each, evaluated by clipline's evaluator on the held-out split: "
            "mean ± std, %; diff = clipline − open_clip_train ± its standard error (**below**: lower by more than "
            "two standard errors).", "",
            *table(["metric", "open_clip_train", "clipline", "diff ± SE"], rows),
            "Ablations: clipline with one setting changed (diff from open_clip_train ± SE, percentage points):", "",
            *table(["clipline setting", "mean cls acc1", "mean t→i R@10", "mean i→t R@10", "metrics below"],
                   ablations)]


def speed_section(benchmarks: dict[str, Any]) -> list[str]:
    out: list[str] = []
    trainer = (benchmarks.get("trainer") or {}).get("figures") or {}
    if t := trainer.get("trainer"):
        out += [f"**Trainer vs open_clip_train** (same tiny model, images, batch {t['batch']}, fp32, one process, "
                f"{t['workers']} workers, {t['repeats']} interleaved repeats): clipline "
                f"{t['clipline']['samples_per_s']:.0f} samples/s, open_clip_train "
                f"{t['open_clip_train']['samples_per_s']:.0f} samples/s: **{t['ratio']:.2f}x**.", ""]
    if c := trainer.get("clipa"):
        rows = [[label, r["image_tokens"], r["text_tokens"], f"{r['step_s'] * 1000:.0f}", f"{r['speedup']:.2f}x"]
                for label, r in c["rows"].items()]
        out += [f"**CLIPA stage-1 step** ({c['model']} model, batch {c['batch']}, compute only):", "",
                *table(["tokens", "image tokens", "text tokens", "step ms", "speed-up"], rows)]
    loader = (benchmarks.get("loader") or {}).get("figures") or {}
    if loader.get("loaders"):
        rows = [[name, f"{r['samples_per_s_per_worker']:.0f}", f"{r['samples_per_s']:.0f}"]
                for name, r in loader["loaders"].items()]
        out += ["**Data loader vs open_clip's** (demo data, same batch and workers):", "",
                *table(["loader", "samples/s per worker", "samples/s"], rows)]
        if "ratio" in loader:
            out += [f"Ratio: **{loader['ratio']:.2f}x**.", ""]
    objectives = (benchmarks.get("objectives") or {}).get("figures") or {}
    if objectives.get("objectives"):
        rows = [[name, f"{r['step_ms']:.1f}", f"{r['vs_clip_pct']:+.1f} %", f"{r['state_bytes_100k_samples']:,}"]
                for name, r in objectives["objectives"].items()]
        out += [f"**Objective step overhead** ({objectives.get('setup', '')}; the control row is clip run twice, "
                "its difference the noise):", "",
                *table(["objective", "step ms", "vs clip", "state bytes, 100k samples"], rows)]
        if tables := objectives.get("fastclip_tables_400M_8gpu"):
            out += ["FastCLIP's u tables per sample (and for 400M samples on a node of 8 GPUs): "
                    + "; ".join(f"{v} {r['bytes_per_sample']} B ({r['node_shared_gb']:g} GB shared per node, "
                                f"{r['replicated_per_rank_gb']:g} GB if each rank held a copy)"
                                for v, r in sorted(tables.items())) + ".", ""]
    rows = [[name, f"{r['wall_s']:.0f}", f"{r['peak_rss_mb']:.0f}", r["returncode"]]
            for name, r in benchmarks.items()]
    out += ["**Each benchmark's wall time and peak memory** (largest resident set of its process tree):", "",
            *table(["benchmark", "wall s", "peak RSS MB", "exit"], rows)]
    return out


def variants_table(paths: list[Path]) -> str:
    """One table of quality.py's part 3 from several ``--only variants --json`` files (processes that split the
    settings between them), the settings in the order of the files."""
    parts = [json.loads(path.read_text())["variants"] for path in paths]
    first = parts[0]
    if any((p["batch"], p["samples"], p["seeds"]) != (first["batch"], first["samples"], first["seeds"]) for p in parts):
        raise SystemExit("the variants files differ in batch, samples or seeds: not one experiment")
    summary = {label: s for p in parts for label, s in p["summary"].items()}
    from quality import variant_comparisons  # torch and the trainer: only for this table

    comparisons = variant_comparisons({label: runs for p in parts for label, runs in p["runs"].items()})
    rows = [[label, *(pct(s[key]) for _, key in METRICS), f"{s['tau'][0]:.3f}"] for label, s in summary.items()]
    lines = [f"Batch {first['batch']}, {first['samples']:,} samples ({first['epochs']} epochs), {first['seeds']} seeds "
             "(mean ± std, %):", "", *table(["setting", *(name for name, _ in METRICS), "final τ"], rows)]
    lines += bullets(comparisons)
    return "\n".join(lines) + "\n"


def ablation_table(defaults: Path, ablation: Path) -> str:
    """Two quality.py ``--json`` runs that differ in one setting (e.g. ``--no-augment``): for every setting in both
    (part 1's objective and batch, part 2's CLIPA rows), defaults minus ablation in each metric ± its standard
    error (the difference alone where a side has one run)."""
    from quality import difference  # torch and the trainer: only for this table

    figures = [json.loads(path.read_text()) for path in (defaults, ablation)]
    runs = [{label: rs for part in ("quality", "clipa") for label, rs in (f.get(part) or {}).get("runs", {}).items()}
            for f in figures]
    rows = []
    for label in (label for label in runs[0] if label in runs[1]):
        ours, theirs = ([[r["final"][key] for r in part[label]] for _, key in METRICS] for part in runs)
        cells = [points(*difference(a, b)) for a, b in zip(ours, theirs)]
        rows.append([label, f"{len(ours[0])} / {len(theirs[0])}",
                     f"{100 * statistics.mean(ours[0]):.1f} / {100 * statistics.mean(theirs[0]):.1f}", *cells])
    if not rows:
        raise SystemExit(f"{defaults} and {ablation} share no setting: nothing to compare")
    return "\n".join(table(["setting", "seeds", "mean cls acc1 %", *(f"Δ {name}" for name, _ in METRICS)], rows))


def render(results: dict[str, Any], plots: str) -> str:
    """Markdown for one run_all.py results.json; ``plots``: where the README finds the run's PNGs."""
    benchmarks = results["benchmarks"]
    total = results.get("wall_s")
    out = [f"Generated by `benchmarks/results_md.py` from the `make bench` run started {results['started']} "
           f"({results['cpu_count']} CPUs"
           + (f", {total / 60:.1f} min in all" if total else "") + ("; QUICK settings, not figures to report"
                                                                      if results.get("quick") else "") + ").", ""]
    quality = (benchmarks.get("quality") or {}).get("figures") or {}
    if "quality" in quality:
        out += quality_section(quality["quality"], plots)
    if "clipa" in quality:
        out += clipa_section(quality["clipa"], plots)
    parity = (benchmarks.get("parity") or {}).get("figures") or {}
    if "comparisons" in parity:
        out += parity_section(parity)
    out += speed_section(benchmarks)
    return "\n".join(out).rstrip() + "\n"


def update_readme(readme: Path, text: str) -> None:
    body = readme.read_text()
    if BEGIN not in body or END not in body:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} markers to replace")
    head, rest = body.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="?", help="run_all.py's --out directory (results.json, PNGs)")
    parser.add_argument("--variants", type=Path, nargs="+", help="print one table from these quality.py part-3 JSONs")
    parser.add_argument("--ablation", type=Path, nargs=2, metavar=("DEFAULTS", "ABLATION"),
                        help="print defaults minus ablation from two quality.py --json files")
    parser.add_argument("--readme", type=Path, help="replace this file's marked section")
    parser.add_argument("--plots", type=Path, default=Path("docs/bench"), help="where --readme copies the PNGs")
    args = parser.parse_args()
    if args.variants:
        print(variants_table(args.variants))
        return
    if args.ablation:
        print(ablation_table(*args.ablation))
        return
    if args.results is None:
        parser.error("give the results directory or --variants")
    results = json.loads((args.results / "results.json").read_text())
    if args.readme:
        if results.get("quick"):
            raise SystemExit("these are --quick results: not figures for the README")
        args.plots.mkdir(parents=True, exist_ok=True)
        for png in args.results.glob("*.png"):
            shutil.copyfile(png, args.plots / png.name)
        plots = Path(args.plots).resolve().relative_to(args.readme.resolve().parent).as_posix()
        update_readme(args.readme, render(results, plots))
        print(f"{args.readme}: results section replaced; plots copied to {args.plots}")
    else:
        print(render(results, "."))


if __name__ == "__main__":
    main()
