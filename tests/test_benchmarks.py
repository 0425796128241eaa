"""``make bench``'s chain at --quick settings: every benchmark runs, its figures land in results.json, the plots and
the README section are written. The figures themselves are not checked here (they are measurements, not behaviour)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results_md import BEGIN, END, update_readme  # noqa: E402


@pytest.mark.slow
def test_run_all_quick_writes_every_figure_plot_and_the_readme_section(tmp_path):
    out = tmp_path / "bench"
    # parity.py has a test of its own (below), which keeps each under pytest's per-test timeout.
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--out", str(out),
                           "--only", "objectives", "loader", "trainer", "quality"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True
    assert set(results["benchmarks"]) == {"objectives", "loader", "trainer", "quality"}
    for name, bench in results["benchmarks"].items():
        assert bench["returncode"] == 0, name
        assert bench["peak_rss_mb"] > 0, name
        assert bench["figures"], name
    figures = {name: b["figures"] for name, b in results["benchmarks"].items()}
    assert {"clip", "siglip", "fastclip-v3", "amorlip-log_l2"} <= set(figures["objectives"]["objectives"])
    assert figures["loader"]["ratio"] > 0
    assert figures["trainer"]["trainer"]["ratio"] > 0
    quality = figures["quality"]["quality"]
    assert set(quality["summary"]) == {f"{o} batch {b}" for o in ("clip", "siglip", "fastclip-v3", "amorlip-log_l2")
                                       for b in (64, 256)}
    for label, summary in quality["summary"].items():
        mean, _ = summary["mean_acc1"]
        assert 0.0 <= mean <= 1.0, label
        assert summary["tau"][0] > 0, label
    assert {"full tokens", "resize 16 px + ft", "random mask 0.25 + ft", "grid mask + ft",
            "block mask 0.25 + ft"} == set(figures["quality"]["clipa"]["summary"])
    for png in ("accuracy_vs_samples.png", "clipa.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    section = (out / "RESULTS.md").read_text()
    assert "QUICK settings" in section
    for heading in ("Objectives at small batch", "CLIPA.", "Trainer vs open_clip_train", "Data loader",
                    "Objective step overhead", "peak memory"):
        assert heading in section, heading
    # the README generator refuses quick figures
    refused = subprocess.run([sys.executable, str(REPO / "benchmarks" / "results_md.py"), str(out), "--readme",
                              str(tmp_path / "README.md")], capture_output=True, text=True)
    assert refused.returncode != 0 and "quick" in refused.stderr


@pytest.mark.slow
def test_parity_compares_every_held_out_metric_with_open_clip_train(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--out", str(out),
                           "--only", "parity"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    parity = json.loads((out / "results.json").read_text())["benchmarks"]["parity"]["figures"]
    assert set(parity["runs"]) == {"open_clip_train", "clipline", *parity["variants"]} and parity["variants"]
    metrics = {r["metric"] for r in parity["comparisons"]["clipline"]}
    # every benchmark's metrics: the three classification sets and the retrieval set, and the headline means
    assert {"animal_mnist/acc1", "openclipart/acc5", "emoji_names/image_retrieval_recall@10", "mean_acc1"} <= metrics
    for runs in parity["runs"].values():
        assert all(0.0 <= v <= 1.0 for run in runs for v in run["metrics"].values()) and runs[0]["wall_s"] > 0
    assert "Parity with open_clip_train" in (out / "RESULTS.md").read_text()


def test_parity_statistics_and_recipe_overrides():
    from parity import below, parse_variant, with_overrides
    from quality import difference

    diff, se = difference([0.5, 0.6, 0.7], [0.8, 0.9, 1.0])
    assert abs(diff + 0.3) < 1e-12 and abs(se - (2 * 0.01 / 3) ** 0.5) < 1e-12 and below(diff, se)
    assert not below(-0.3, 0.2) and not below(-0.3, 0.0)  # one run each: no standard error, no verdict
    label, overrides = parse_variant("no clip: grad clip off:optimizer.grad_clip_norm=null;stages.0.augment=none")
    assert label == "no clip: grad clip off" and overrides == {"optimizer.grad_clip_norm": None,
                                                              "stages.0.augment": "none"}
    assert parse_variant("strong:stages.0.augment={scale: [0.4, 1.0]}") == ("strong",
                                                                            {"stages.0.augment": {"scale": [0.4, 1.0]}})
    with pytest.raises(SystemExit, match="expected LABEL"):
        parse_variant("stages.0.augment=none")
    doc = {"optimizer": {"grad_clip_norm": 1.0}, "stages": [{"name": "full"}]}
    changed = with_overrides(doc, overrides)
    assert changed == {"optimizer": {"grad_clip_norm": None}, "stages": [{"name": "full", "augment": "none"}]}
    assert doc["optimizer"]["grad_clip_norm"] == 1.0  # the original is left alone
    with pytest.raises(SystemExit, match="no 'optimiser'"):
        with_overrides(doc, {"optimiser.eps": 1e-8})


def test_quality_ablation_turns_augmentation_off_in_every_stage():
    from quality import OBJECTIVES, recipe_doc

    from components.common.config import load
    from components.common.recipe import Augmentation, Recipe

    def stages(augment: bool):
        doc = recipe_doc(OBJECTIVES["clip"], 256, 0, 4096, 2e-3, 2, 1, stage1_image={"size": 16}, finetune_share=0.2,
                         augment=augment)
        return load(Recipe, doc, "bench").stages

    assert [s.augment for s in stages(True)] == [Augmentation(), Augmentation()]  # the default a user starts from
    assert [s.augment for s in stages(False)] == [None, None]


def test_ablation_table_subtracts_the_ablation_per_shared_setting(tmp_path):
    from results_md import ablation_table

    def run(acc: float) -> dict:
        return {"final": {"mean_acc1": acc, "animal_mnist/acc1": 0.5, "t2i_r5": 0.2, "i2t_r5": 0.1}}

    defaults, ablation = tmp_path / "a.json", tmp_path / "b.json"
    defaults.write_text(json.dumps({"quality": {"runs": {"clip batch 64": [run(0.30), run(0.32)],
                                                         "siglip batch 64": [run(0.9)]}},
                                    "clipa": {"runs": {"grid mask + ft": [run(0.25)]}}}))
    ablation.write_text(json.dumps({"quality": {"runs": {"clip batch 64": [run(0.26), run(0.26)]}},
                                    "clipa": {"runs": {"grid mask + ft": [run(0.20)]}}}))
    lines = ablation_table(defaults, ablation).splitlines()
    # the SE of the difference: the defaults' std 0.0141 over 2 runs, the ablation's 0
    assert lines[2] == "| clip batch 64 | 2 / 2 | 31.0 / 26.0 | +5.0 ± 1.0 | +0.0 ± 0.0 | +0.0 ± 0.0 | +0.0 ± 0.0 |"
    assert lines[3] == "| grid mask + ft | 1 / 1 | 25.0 / 20.0 | +5.0 | +0.0 | +0.0 | +0.0 |"  # one seed: no SE
    assert len(lines) == 4  # header, rule and the two shared settings: siglip is not in both
    ablation.write_text(json.dumps({"quality": {"runs": {"amorlip batch 64": [run(0.2)]}}}))
    with pytest.raises(SystemExit, match="share no setting"):
        ablation_table(defaults, ablation)


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{BEGIN}\nold figures\n{END}\nafter\n")
    update_readme(readme, "new figures\n")
    assert readme.read_text() == f"# title\n\nbefore\n{BEGIN}\nnew figures\n{END}\nafter\n"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        update_readme(readme, "x\n")
