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
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--out", str(out)],
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


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{BEGIN}\nold figures\n{END}\nafter\n")
    update_readme(readme, "new figures\n")
    assert readme.read_text() == f"# title\n\nbefore\n{BEGIN}\nnew figures\n{END}\nafter\n"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        update_readme(readme, "x\n")
