"""The evaluation report: self-contained, escaped HTML; markdown summary; flat KFP metrics; publishing via the store."""

from __future__ import annotations

import base64
import io
import json
import math
import random
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from components.common import store
from components.evaluate import report

HOSTILE = "<script>alert(1)</script>"
REPO = Path(__file__).resolve().parents[1]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def _png_b64(color: tuple[int, int, int], shape: str, size: int = 64) -> str:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


COLORS = {
    "red": (220, 38, 38), "green": (22, 163, 74), "blue": (37, 99, 235), "yellow": (234, 179, 8),
    "purple": (147, 51, 234), "orange": (234, 88, 12), "pink": (236, 72, 153), "teal": (13, 148, 136),
    "gray": (107, 114, 128), "brown": (120, 53, 15),
}


def make_result() -> dict:
    """A realistic metrics.json: 10-class (with confusion matrix), 40-class (without), one retrieval dataset."""
    rng = random.Random(0)
    names10 = [f"{c} circle" for c in COLORS]
    names10[3] = HOSTILE  # a hostile class name
    conf = [[0] * 10 for _ in range(10)]
    for i in range(10):
        for _ in range(20):
            j = i if rng.random() < 0.4 + 0.05 * i else rng.randrange(10)
            conf[i][j] += 1
    recall10 = [conf[i][i] / sum(conf[i]) for i in range(10)]
    examples10 = []
    for k, (_color, rgb) in enumerate(list(COLORS.items())[:6]):
        label = names10[k]
        probs = sorted((rng.random() for _ in range(5)), reverse=True)
        total = sum(probs) * 1.2
        others = [n for n in names10 if n != label]
        if k % 3:
            top_names = [label, *rng.sample(others, 4)]
        else:
            top_names = [*rng.sample(others, 2), label, *rng.sample(others, 2)]
        examples10.append({
            "image_png_base64": _png_b64(rgb, "circle"), "label": label,
            "top": [[n, p / total] for n, p in zip(top_names, probs)],
        })
    names40 = [f"class {i:02d} {'long name ' * (i % 4)}".strip() for i in range(40)]
    recall40 = [rng.random() for _ in range(40)]
    captions = [
        ["a red circle on a white background", "red round shape"],
        ["a blue square", HOSTILE],
        ["a green square drawn in the middle", "green box"],
    ]
    ret_examples = [
        {"image_png_base64": _png_b64(COLORS["red"], "circle"), "captions": captions[0],
         "top_captions": [captions[0][0], "a pink circle", "an orange circle", captions[0][1], "a red square"]},
        {"image_png_base64": _png_b64(COLORS["blue"], "square"), "captions": captions[1],
         "top_captions": ["a purple square", HOSTILE, "a blue circle", "a teal square", "a gray square"]},
        {"image_png_base64": _png_b64(COLORS["green"], "square"), "captions": captions[2],
         "top_captions": ["green box", "a teal square", "a green circle", "a yellow square", "a brown square"]},
    ]
    return {
        "model": {"name_or_config": "ViT-B-32", "checkpoint": "s3://runs/demo/stage2/final/model.pt"},
        "notes": ["evaluation uses the full text length even when the model was pretrained with a CLIPA text mask",
                  f"note with markup {HOSTILE}"],
        "datasets": {
            "shapes10": {
                "task": "zeroshot_classification", "num_samples": 200,
                "metrics": {"acc1": 0.6234, "acc5": 0.9312, "mean_per_class_recall": sum(recall10) / 10},
                "classnames": names10, "per_class_recall": recall10, "confusion_matrix": conf,
                "examples": examples10,
            },
            "wide40 <b>": {
                "task": "zeroshot_classification", "num_samples": 4000,
                "metrics": {"acc1": 0.1875, "acc5": 0.4449, "mean_per_class_recall": sum(recall40) / 40},
                "classnames": names40, "per_class_recall": recall40, "examples": [],
            },
            "captions-demo": {
                "task": "zeroshot_retrieval", "num_images": 500, "num_texts": 2500,
                "metrics": {"image_retrieval_recall@1": 0.3114, "image_retrieval_recall@5": 0.6021,
                            "image_retrieval_recall@10": 0.7145, "text_retrieval_recall@1": 0.402,
                            "text_retrieval_recall@5": 0.7,
                            "text_retrieval_recall@10": 0.8},
                "examples": ret_examples,
            },
        },
    }


def make_log(n: int = 120) -> list[dict]:
    rows = []
    for i in range(n):
        step = i * 50
        rows.append({"step": step, "samples": step * 256, "loss": 5.5 * math.exp(-i / 40) + 0.8 + 0.05 * math.sin(i),
                     "lr": 5e-4 * min(1.0, (i + 1) / 10) * (0.5 * (1 + math.cos(math.pi * i / n))),
                     "temperature": max(0.01, 0.07 * math.exp(-i / 60))})
    rows[5]["loss"] = float("nan")  # non-finite values must not break the chart
    return rows


class _Checker(HTMLParser):
    """Balanced tags, every src/href, and the text nodes (to see what an escaped string turns into)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href", "action", "srcset")]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href")]

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _check(html: str) -> _Checker:
    c = _Checker()
    c.feed(html)
    c.close()
    assert not c.errors, c.errors[:5]
    assert c.stack == [], c.stack
    return c


@pytest.fixture(scope="module")
def result() -> dict:
    return make_result()


@pytest.fixture(scope="module")
def page(result) -> str:
    return report.render_html(result, make_log())


def test_html_is_balanced_and_self_contained(page):
    c = _check(page)
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert "script" not in c.tags and "link" not in c.tags and "iframe" not in c.tags
    assert c.urls, "expected inline images and anchors"
    for url in c.urls:
        assert url.startswith("data:image/png;base64,") or url.startswith("#"), url[:60]
    # 6 classification + 3 retrieval thumbnails, all inline
    assert c.tags.count("img") == 9
    assert c.tags.count("svg") >= 1 + 1 + 3  # two recall charts, loss/temperature/lr curves


def test_html_has_every_metric_as_shown_in_the_table(result, page):
    for name, ds in result["datasets"].items():
        assert f">{report._e(name)}<" in page
        for value in ds["metrics"].values():
            assert f">{100 * value:.1f}<" in page, (name, value)
        if ds["task"] == "zeroshot_classification":
            n = len(ds["classnames"])
            assert f">{100 / n:.1f}<" in page  # chance level
            assert f">{ds['num_samples']}<" in page
    assert ">62.3<" in page and ">93.1<" in page and ">18.8<" in page and ">31.1<" in page and ">70.0<" in page


def test_html_sections(result, page):
    assert "evaluation uses the full text length even when the model was pretrained with a CLIPA text mask" in page
    assert "ViT-B-32" in page and "s3://runs/demo/stage2/final/model.pt" in page
    assert page.count('class="confusion"') == 1  # only the 10-class dataset carries a matrix
    assert "the 25 best" not in page  # 40 classes all drawn
    assert page.count('class="bar"') == 50
    # the confusion counts are all in the table
    conf = result["datasets"]["shapes10"]["confusion_matrix"]
    assert page.count('class="diag"') == 10
    for i in range(10):
        assert f">{conf[i][i]}</td>" in page
    # examples: correct / wrong marked, hits marked
    assert page.count("✓ correct") == 4 and page.count("✗ wrong") == 2
    assert "✓ top-1 hit" in page and "✗ top-1 miss" in page
    assert 'id="training"' in page and ">temperature<" in page and ">loss<" in page


def test_hostile_strings_are_escaped(page):
    c = _check(page)
    assert HOSTILE not in page
    assert "wide40 <b>" not in page and "wide40 &lt;b&gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # they still read as the original text
    text = "".join(c.text)
    assert HOSTILE in text and "wide40 <b>" in text


def test_bad_image_data_is_not_injected():
    res = make_result()
    res["datasets"]["shapes10"]["examples"][0]["image_png_base64"] = '" onerror="alert(1)'
    html = report.render_html(res)
    assert "onerror" not in html.replace("&quot; onerror=&quot;", "")  # never as an attribute
    assert "bad image data" in html
    _check(html)


def test_many_classes_show_best_and_worst_only():
    names = [f"c{i}" for i in range(1000)]
    recalls = [i / 999 for i in range(1000)]
    svg = report.recall_bar_chart(names, recalls, chance=0.001)
    assert svg.count('class="bar"') == 50
    assert ">c999<" in svg and ">c0<" in svg and ">c500<" not in svg


def test_minimal_and_empty_results_render():
    _check(report.render_html({"model": {}, "datasets": {}}))
    res = {"model": {"name_or_config": {"embed_dim": 64, "vision_cfg": {"layers": 2}}, "checkpoint": None},
           "datasets": {"x": {"task": "zeroshot_classification", "num_samples": 3,
                              "metrics": {"acc1": float("nan"), "mean_per_class_recall": 0.5},
                              "classnames": ["a", "b"], "per_class_recall": [1.0, 0.0],
                              "confusion_matrix": [[1, 0], [1, 1]]}}}
    html = report.render_html(res, [{"step": 0, "loss": 1.0}])
    _check(html)
    assert "&quot;embed_dim&quot;: 64" in html
    assert report.kfp_metrics(res) == {"x/mean_per_class_recall": 0.5}


def test_markdown_summary(result):
    md = report.render_markdown(result)
    assert "| dataset | classes | samples | top-1 | top-5 | mean per-class recall | chance (top-1) |" in md
    assert "| shapes10 | 10 | 200 | 62.3 | 93.1 |" in md
    assert "| captions-demo | 500 | 2500 | 31.1 | 60.2 | 71.5 | 40.2 | 70.0 | 80.0 |" in md
    assert "| 2.5 |" in md  # chance for 40 classes
    assert "CLIPA text mask" in md
    assert HOSTILE not in md and "wide40 &lt;b&gt;" in md


def test_kfp_metrics_flat_floats(result):
    m = report.kfp_metrics(result)
    assert m["shapes10/acc1"] == pytest.approx(0.6234)
    assert m["captions-demo/text_retrieval_recall@10"] == pytest.approx(0.8)
    assert len(m) == 3 + 3 + 6
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in m.items())


def test_log_kfp_metrics_on_a_real_metrics_artifact(result, tmp_path):
    dsl = pytest.importorskip("kfp.dsl")
    artifact = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    logged = report.log_kfp_metrics(artifact, result)
    assert artifact.metadata == logged == report.kfp_metrics(result)
    json.dumps(artifact.metadata)  # serialisable, small
    assert len(json.dumps(artifact.metadata)) < 2000


def test_write_report_to_file_store_with_jsonl_log(result, tmp_path):
    log_path = tmp_path / "train_log.jsonl"
    log_path.write_text("".join(json.dumps(r) + "\n" for r in make_log(30)))
    prefix = (tmp_path / "out" / "eval").as_uri()
    uris = report.write_report(result, prefix, training_log=log_path.as_uri())
    assert uris == {"html": prefix + "/report.html", "markdown": prefix + "/summary.md"}
    html = store.get_bytes(uris["html"]).decode("utf-8")
    assert 'id="training"' in html and ">62.3<" in html
    assert store.get_bytes(uris["markdown"]).decode("utf-8") == report.render_markdown(result)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(html_path: Path, png_path: Path, user_data_dir: Path, height: int = 2000) -> None:
    """Render a page headless with chromium (no network, no GPU) into a PNG."""
    browser = _chromium()
    assert browser
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={user_data_dir}", f"--screenshot={png_path}", f"--window-size=1200,{height}",
         html_path.as_uri()],
        check=True, capture_output=True, timeout=90,
    )


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (Debian package: chromium)")
def test_renders_in_headless_chromium(page, tmp_path):
    html_path = tmp_path / "report.html"
    html_path.write_text(page, encoding="utf-8")
    png = tmp_path / "shot.png"
    screenshot(html_path, png, tmp_path / "profile")
    assert png.exists() and png.stat().st_size > 20_000
    with Image.open(png) as img:
        assert img.size == (1200, 2000)
        colors = img.convert("RGB").resize((60, 100)).getcolors(maxcolors=10_000)
        assert colors is not None and len(colors) > 20  # not a blank page


if __name__ == "__main__":  # regenerate docs/report-example.png: python -m tests.test_report
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "report.html").write_text(report.render_html(make_result(), make_log()), encoding="utf-8")
        (REPO / "docs").mkdir(exist_ok=True)
        screenshot(t / "report.html", REPO / "docs" / "report-example.png", t / "profile", height=4000)
        print(REPO / "docs" / "report-example.png")
