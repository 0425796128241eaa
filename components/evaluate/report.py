"""The evaluation report: one self-contained HTML page, a markdown summary and flat KFP metrics from ``metrics.json``.

Input is the dict the evaluate stage writes (``metrics.json``)::

    {"model": {"name_or_config": ..., "checkpoint": ...}, "notes": [str, ...],
     "datasets": {name: {"task": "zeroshot_classification", "num_samples", "metrics": {"acc1", "acc5"?,
                         "mean_per_class_recall"}, "classnames", "per_class_recall", "confusion_matrix"?,
                         "examples": [{"image_png_base64", "label", "top": [[classname, prob], ...]}]}
                       | {"task": "zeroshot_retrieval", "num_images", "num_texts", "metrics": {
                          "image_retrieval_recall@K", "text_retrieval_recall@K" for K in 1, 5, 10},
                          "examples": [{"image_png_base64", "captions", "top_captions"}]}}}

plus, optionally, the training log: one dict per logged step (``step``, ``samples``, ``loss``, ``lr``,
``temperature``, ...), as a list or as a JSON-lines file / URI (:func:`load_training_log`).

Outputs:

- :func:`render_html` -- the page for the KFP UI's HTML visualisation. It must stand alone: no external URL, no
  script; CSS inline, thumbnails as ``data:`` URIs, charts as inline SVG. Every string that comes from the data
  (class names, captions, dataset names, notes) goes through :func:`html.escape`.
- :func:`render_markdown` -- a short summary (model, notes, metric tables) for the KFP UI's markdown visualisation
  and for logs.
- :func:`kfp_metrics` / :func:`log_kfp_metrics` -- ``"<dataset>/<metric>" -> float`` for a small KFP ``Metrics``
  artifact.
- :func:`write_report` -- publishes ``report.html`` and ``summary.md`` under a prefix through the object store.

Metrics are fractions in ``metrics.json`` and shown as percentages with one decimal everywhere (``0.6234`` -> ``62.3``).
Naming follows open_clip: ``image_retrieval_recall@K`` is text -> image retrieval (a caption finds its image),
``text_retrieval_recall@K`` is image -> text.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from html import escape
from typing import Any, Iterable, Sequence

from components.common import store

CLASSIFICATION = "zeroshot_classification"
RETRIEVAL = "zeroshot_retrieval"

# Column order of the metric tables; metrics a dataset reports beyond these are appended after them.
CLASSIFICATION_METRICS = ("acc1", "acc5", "mean_per_class_recall")
RETRIEVAL_METRICS = tuple(
    f"{kind}_retrieval_recall@{k}" for kind in ("image", "text") for k in (1, 5, 10)
)
_METRIC_LABELS = {
    "acc1": "top-1",
    "acc5": "top-5",
    "mean_per_class_recall": "mean per-class recall",
    **{f"image_retrieval_recall@{k}": f"text→image R@{k}" for k in (1, 5, 10)},
    **{f"text_retrieval_recall@{k}": f"image→text R@{k}" for k in (1, 5, 10)},
}
# Curves drawn from the training log, in this order, when the log has them.
CURVE_KEYS = ("loss", "temperature", "lr")
# Above this many classes the recall chart shows only the best and the worst classes.
MAX_RECALL_BARS = 60
_BARS_EACH_END = 25

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=\s]*$")

DEFAULT_TITLE = "clipline evaluation report"


# ----------------------------------------------------------------------------------------------------------------
# Formatting helpers


def pct(value: Any) -> str:
    """A fraction as a percentage with one decimal (``0.6234`` -> ``"62.3"``); ``"–"`` when missing or not finite."""
    if not _is_number(value):
        return "–"
    return f"{100.0 * float(value):.1f}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _num(value: float) -> str:
    """A compact axis / cell number: 1.2M, 35k, 0.0123, 4.5."""
    v = float(value)
    a = abs(v)
    if a >= 1e9:
        return f"{v / 1e9:.3g}G"
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a == 0:
        return "0"
    if a >= 1:
        return f"{v:.4g}"
    return f"{v:.3g}"


def _e(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return escape(str(value), quote=True)


def _md(value: Any) -> str:
    """Make a value safe inside a markdown table cell."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return escape(text, quote=False)


def _img(b64: Any, alt: str, css_class: str = "thumb") -> str:
    """An inline <img> from base64 PNG data (a bare base64 string or a ``data:image/png;base64,`` URI)."""
    if not isinstance(b64, str) or not b64:
        return f'<div class="{css_class} noimg">no image</div>'
    data = b64.split(",", 1)[1] if b64.startswith("data:") else b64
    if not _BASE64_RE.match(data):
        return f'<div class="{css_class} noimg">bad image data</div>'
    data = "".join(data.split())
    try:
        head = base64.b64decode(data[:24] + "=" * (-len(data[:24]) % 4), validate=False)
    except (binascii.Error, ValueError):
        head = b""
    mime = "image/jpeg" if head.startswith(b"\xff\xd8") else "image/png"
    return f'<img class="{css_class}" alt="{_e(alt)}" src="data:{mime};base64,{data}">'


def _num_classes(ds: dict) -> int:
    return len(ds.get("classnames") or ds.get("per_class_recall") or [])


def _metric_columns(datasets: Iterable[dict], preferred: Sequence[str]) -> list[str]:
    cols = [m for m in preferred if any(m in (d.get("metrics") or {}) for d in datasets)]
    for d in datasets:
        for m in d.get("metrics") or {}:
            if m not in cols:
                cols.append(m)
    return cols


def _split(result: dict) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict]]:
    """(classification, retrieval, other) datasets, in the order of the result."""
    cls, ret, other = {}, {}, {}
    for name, ds in (result.get("datasets") or {}).items():
        task = ds.get("task")
        (cls if task == CLASSIFICATION else ret if task == RETRIEVAL else other)[name] = ds
    return cls, ret, other


def _model_fields(result: dict) -> tuple[str, str]:
    model = result.get("model") or {}
    name = model.get("name_or_config", "")
    if not isinstance(name, str):
        name = json.dumps(name, sort_keys=True)
    return name, str(model.get("checkpoint") or "")


# ----------------------------------------------------------------------------------------------------------------
# Metric tables


def _table_rows(result: dict) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """Header and rows (plain strings, unescaped) of the classification and the retrieval table."""
    cls, ret, _ = _split(result)
    c_cols = _metric_columns(cls.values(), CLASSIFICATION_METRICS)
    c_head = ["dataset", "classes", "samples", *[_METRIC_LABELS.get(c, c) for c in c_cols], "chance (top-1)"]
    c_rows = []
    for name, ds in cls.items():
        n = _num_classes(ds)
        metrics = ds.get("metrics") or {}
        c_rows.append(
            [name, str(n or "–"), str(ds.get("num_samples", "–")), *[pct(metrics.get(c)) for c in c_cols],
             pct(1.0 / n) if n else "–"]
        )
    r_cols = _metric_columns(ret.values(), RETRIEVAL_METRICS)
    r_head = ["dataset", "images", "texts", *[_METRIC_LABELS.get(c, c) for c in r_cols]]
    r_rows = []
    for name, ds in ret.items():
        metrics = ds.get("metrics") or {}
        r_rows.append(
            [name, str(ds.get("num_images", "–")), str(ds.get("num_texts", "–")),
             *[pct(metrics.get(c)) for c in r_cols]]
        )
    return c_head, c_rows, r_head, r_rows


def _html_table(head: list[str], rows: list[list[str]], anchor_prefix: str) -> str:
    out = ['<table class="metrics"><thead><tr>']
    out += [f"<th>{_e(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        out.append(f'<td class="name"><a href="#{_e(anchor_prefix + _slug(row[0]))}">{_e(row[0])}</a></td>')
        out += [f'<td class="num">{_e(cell)}</td>' for cell in row[1:]]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


# ----------------------------------------------------------------------------------------------------------------
# SVG charts


def _truncate(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def recall_bar_chart(classnames: Sequence[str], recalls: Sequence[float], chance: float | None = None) -> str:
    """A horizontal bar chart of per-class recall, best first (inline SVG). With many classes: best and worst only."""
    pairs = sorted(
        ((str(c), float(r)) for c, r in zip(classnames, recalls) if _is_number(r)), key=lambda p: (-p[1], p[0])
    )
    if not pairs:
        return '<p class="muted">no per-class recall</p>'
    shown: list[tuple[str, float] | None] = list(pairs)
    note = ""
    if len(pairs) > MAX_RECALL_BARS:
        shown = [*pairs[:_BARS_EACH_END], None, *pairs[-_BARS_EACH_END:]]
        note = (
            f'<p class="muted">{len(pairs)} classes: the {_BARS_EACH_END} best and the {_BARS_EACH_END} worst '
            "are shown.</p>"
        )
    label_w, bar_w, row_h, top = 190, 420, 16, 22
    width = label_w + bar_w + 60
    height = top + row_h * len(shown) + 8
    out = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="per-class recall">'
    ]
    for tick in (0, 25, 50, 75, 100):
        x = label_w + bar_w * tick / 100
        out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 6}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{top - 8}" class="tick" text-anchor="middle">{tick}%</text>')
    for i, pair in enumerate(shown):
        y = top + i * row_h
        if pair is None:
            out.append(f'<text x="{label_w - 6}" y="{y + 12}" class="label" text-anchor="end">⋯</text>')
            continue
        name, r = pair
        w = bar_w * max(0.0, min(1.0, r))
        out.append(
            f"<g><title>{_e(name)}: {pct(r)}%</title>"
            f'<text x="{label_w - 6}" y="{y + 12}" class="label" text-anchor="end">{_e(_truncate(name, 28))}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row_h - 4}" class="bar"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 12}" class="value">{pct(r)}</text></g>'
        )
    if chance is not None and 0 <= chance <= 1:
        x = label_w + bar_w * chance
        out.append(f'<line x1="{x:.1f}" y1="{top - 2}" x2="{x:.1f}" y2="{height - 6}" class="chance"/>')
    out.append("</svg>")
    legend = '<p class="muted">dashed line: chance level</p>' if chance is not None else ""
    return note + "".join(out) + legend


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def line_chart(xs: Sequence[float], ys: Sequence[float], x_label: str, y_label: str) -> str:
    """A line chart of ``ys`` against ``xs`` (inline SVG); points that are not finite numbers are dropped."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if _is_number(x) and _is_number(y)]
    if not pts:
        return f'<p class="muted">no {_e(y_label)} values</p>'
    width, height = 520, 240
    left, right, top, bottom = 62, 14, 14, 40
    pw, ph = width - left - right, height - top - bottom
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    else:
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + pw * (x - x0) / (x1 - x0)

    def sy(y: float) -> float:
        return top + ph * (1 - (y - y0) / (y1 - y0))

    out = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{_e(y_label)} against {_e(x_label)}">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>',
    ]
    for t in _nice_ticks(y0, y1):
        y = sy(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{left - 5}" y="{y + 4:.1f}" class="tick" text-anchor="end">{_e(_num(t))}</text>')
    for t in _nice_ticks(x0, x1):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" class="grid"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 15}" class="tick" text-anchor="middle">{_e(_num(t))}</text>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(pts))
    out.append(f'<path d="{path}" class="line"/>')
    if len(pts) == 1:
        out.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" class="dot"/>')
    out.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 6}" class="axis" text-anchor="middle">{_e(x_label)}</text>'
        f'<text x="14" y="{top + ph / 2:.1f}" class="axis" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + ph / 2:.1f})">{_e(y_label)}</text>'
    )
    out.append("</svg>")
    return "".join(out)


def confusion_table(classnames: Sequence[str], matrix: Sequence[Sequence[int]]) -> str:
    """The confusion matrix as an HTML table, rows = true class, columns = predicted, cells shaded by row share."""
    n = len(matrix)
    names = [str(c) for c in classnames] + [str(i) for i in range(len(classnames), n)]
    out = ['<table class="confusion"><thead><tr><th class="corner">true ↓ predicted →</th>']
    out += [f'<th title="{_e(names[j])}">{j}</th>' for j in range(n)]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(matrix):
        total = sum(v for v in row if _is_number(v)) or 1
        out.append(f'<tr><th class="rowname" title="{_e(names[i])}">{i}&nbsp;{_e(_truncate(names[i], 24))}</th>')
        for j, v in enumerate(row):
            share = (float(v) / total) if _is_number(v) else 0.0
            alpha = max(0.0, min(1.0, share))
            color = "#fff" if alpha > 0.55 else "#1f2937"
            cls = ' class="diag"' if i == j else ""
            out.append(
                f'<td{cls} style="background:rgba(37,99,235,{alpha:.3f});color:{color}" '
                f'title="true {_e(names[i])} → predicted {_e(names[j])}: {_e(v)}">{_e(v)}</td>'
            )
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Examples


def _classification_examples(examples: Sequence[dict]) -> str:
    if not examples:
        return ""
    out = ['<div class="examples">']
    for ex in examples:
        label = str(ex.get("label", ""))
        top = [t for t in (ex.get("top") or []) if isinstance(t, (list, tuple)) and len(t) >= 2][:5]
        correct = bool(top) and str(top[0][0]) == label
        mark = '<span class="ok">✓ correct</span>' if correct else '<span class="bad">✗ wrong</span>'
        out.append(f'<div class="card {"correct" if correct else "wrong"}">')
        out.append(_img(ex.get("image_png_base64"), label))
        out.append(f'<div class="truth">true: <b>{_e(label)}</b> {mark}</div><ol class="top">')
        for name, prob in top:
            hit = ' class="hit"' if str(name) == label else ""
            out.append(f'<li{hit}>{_e(name)} <span class="prob">{pct(prob)}%</span></li>')
        out.append("</ol></div>")
    out.append("</div>")
    return "".join(out)


def _retrieval_examples(examples: Sequence[dict]) -> str:
    if not examples:
        return ""
    out = ['<div class="examples">']
    for ex in examples:
        captions = [str(c) for c in ex.get("captions") or []]
        top = [str(c) for c in ex.get("top_captions") or []]
        hit1 = bool(top) and top[0] in captions
        mark = '<span class="ok">✓ top-1 hit</span>' if hit1 else '<span class="bad">✗ top-1 miss</span>'
        out.append(f'<div class="card wide {"correct" if hit1 else "wrong"}">')
        out.append(_img(ex.get("image_png_base64"), captions[0] if captions else "image"))
        out.append(f'<div class="truth">its captions {mark}</div><ul class="captions">')
        out += [f"<li>{_e(c)}</li>" for c in captions]
        out.append('</ul><div class="truth">retrieved captions</div><ol class="top">')
        for c in top:
            hit = c in captions
            out.append(f'<li class="hit">{_e(c)} ✓</li>' if hit else f"<li>{_e(c)}</li>")
        out.append("</ol></div>")
    out.append("</div>")
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Training log


def load_training_log(source: str | Sequence[dict] | None) -> list[dict] | None:
    """The training log as a list of dicts, from a list, a JSON-lines (or JSON array) file path or store URI."""
    if source is None:
        return None
    if not isinstance(source, str):
        return [dict(r) for r in source]
    text = store.get_bytes(source).decode("utf-8")
    stripped = text.strip()
    if stripped.startswith("["):
        return [dict(r) for r in json.loads(stripped)]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _training_section(log: Sequence[dict]) -> str:
    rows = [r for r in log if isinstance(r, dict)]
    if not rows:
        return ""
    x_key = next((k for k in ("step", "samples") if any(_is_number(r.get(k)) for r in rows)), None)
    xs = [r.get(x_key) if x_key else i for i, r in enumerate(rows)]
    x_label = x_key or "log entry"
    charts = []
    for key in CURVE_KEYS:
        ys = [r.get(key) for r in rows]
        if any(_is_number(y) for y in ys):
            charts.append(f'<figure><figcaption>{_e(key)}</figcaption>{line_chart(xs, ys, x_label, key)}</figure>')
    if not charts:
        return ""
    last = rows[-1]
    facts = ", ".join(f"{_e(k)} {_e(_num(last[k]))}" for k in ("step", "samples", "loss") if _is_number(last.get(k)))
    summary = f'<p class="muted">{len(rows)} log entries; last: {facts}.</p>' if facts else ""
    return f'<section id="training"><h2>Training</h2>{summary}<div class="charts">{"".join(charts)}</div></section>'


# ----------------------------------------------------------------------------------------------------------------
# Page

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:24px;color:#1f2937;
background:#fff;font-size:14px;line-height:1.4}
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;
padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.muted{color:#6b7280;font-size:12px;margin:4px 0}
dl.model{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:8px 0}dl.model dt{color:#6b7280}
dl.model dd{margin:0;font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
ul.notes{background:#fffbeb;border:1px solid #fde68a;border-radius:6px;padding:8px 8px 8px 28px;margin:8px 0}
table{border-collapse:collapse;margin:6px 0}
table.metrics th,table.metrics td{border:1px solid #e5e7eb;padding:4px 10px}
table.metrics th{background:#f3f4f6;font-weight:600;text-align:center}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.name a{color:#1d4ed8;text-decoration:none}
table.confusion{font-size:11px}table.confusion td{width:30px;height:22px;text-align:center;
border:1px solid #e5e7eb;font-variant-numeric:tabular-nums}table.confusion td.diag{outline:2px solid #111827;
outline-offset:-2px}table.confusion th{font-weight:500;padding:2px 4px;color:#374151}
table.confusion th.rowname{text-align:left;white-space:nowrap}th.corner{font-size:10px;color:#6b7280}
svg.chart{display:block;font-size:11px}svg .grid{stroke:#e5e7eb;stroke-width:1}svg .bar{fill:#2563eb}
svg .chance{stroke:#dc2626;stroke-width:1.5;stroke-dasharray:4 3}svg .label{fill:#374151}
svg .value,svg .tick{fill:#6b7280;font-size:10px}svg .axis{fill:#374151;font-size:12px}
svg .plot{fill:none;stroke:#d1d5db}svg .line{fill:none;stroke:#2563eb;stroke-width:1.8}svg .dot{fill:#2563eb}
.charts{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0}figcaption{font-weight:600;margin-bottom:2px}
.examples{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #e5e7eb;border-radius:6px;padding:8px;width:200px;font-size:12px;border-top:4px solid #9ca3af}
.card.wide{width:300px}.card.correct{border-top-color:#16a34a}.card.wrong{border-top-color:#dc2626}
img.thumb,.thumb.noimg{width:100%;max-height:200px;object-fit:contain;background:#f9fafb;image-rendering:auto}
.noimg{color:#9ca3af;text-align:center;padding:30px 0}
.truth{margin:6px 0 2px}ol.top,ul.captions{margin:2px 0;padding-left:20px}
li.hit{color:#15803d;font-weight:600}.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}
.prob{color:#6b7280;font-variant-numeric:tabular-nums}
"""


def render_html(result: dict, training_log: list[dict] | None = None, title: str = DEFAULT_TITLE) -> str:
    """The whole report as one self-contained HTML page (no external URL, no script)."""
    cls, ret, other = _split(result)
    name, checkpoint = _model_fields(result)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{_e(title)}</h1>",
        f'<dl class="model"><dt>model</dt><dd>{_e(name) or "–"}</dd>'
        f'<dt>checkpoint</dt><dd>{_e(checkpoint) or "–"}</dd></dl>',
    ]
    notes = [str(n) for n in result.get("notes") or []]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    parts.append("</header>")

    c_head, c_rows, r_head, r_rows = _table_rows(result)
    parts.append('<section id="summary"><h2>Metrics</h2><p class="muted">percent; chance level = 1 / number of '
                 "classes</p>")
    if c_rows:
        parts.append("<h3>Zero-shot classification</h3>" + _html_table(c_head, c_rows, "ds-"))
    if r_rows:
        parts.append('<h3>Zero-shot retrieval</h3><p class="muted">text→image: a caption retrieves its image; '
                     "image→text: an image retrieves one of its captions</p>" + _html_table(r_head, r_rows, "ds-"))
    if other:
        parts.append('<p class="muted">datasets with an unknown task: ' + _e(", ".join(other)) + "</p>")
    if not (c_rows or r_rows):
        parts.append('<p class="muted">no datasets were evaluated</p>')
    parts.append("</section>")

    for ds_name, ds in cls.items():
        n = _num_classes(ds)
        metrics = ds.get("metrics") or {}
        parts.append(f'<section id="ds-{_e(_slug(ds_name))}" class="dataset"><h2>{_e(ds_name)}</h2>')
        parts.append(
            f'<p class="muted">zero-shot classification: {n} classes, {_e(ds.get("num_samples", "–"))} samples, '
            f"top-1 {pct(metrics.get('acc1'))}% (chance {pct(1 / n) if n else '–'}%)</p>"
        )
        recalls = ds.get("per_class_recall") or []
        if recalls:
            classnames = list(ds.get("classnames") or []) + [str(i) for i in range(n)][len(ds.get("classnames") or []):]
            parts.append("<h3>Per-class recall</h3>" + recall_bar_chart(classnames, recalls, 1 / n if n else None))
        if ds.get("confusion_matrix"):
            parts.append(
                "<h3>Confusion matrix</h3>"
                '<p class="muted">rows: true class, columns: predicted class (numbered as in the rows); '
                "shade: share of the row</p>" + confusion_table(ds.get("classnames") or [], ds["confusion_matrix"])
            )
        if ds.get("examples"):
            parts.append("<h3>Examples</h3>" + _classification_examples(ds["examples"]))
        parts.append("</section>")

    for ds_name, ds in ret.items():
        parts.append(f'<section id="ds-{_e(_slug(ds_name))}" class="dataset"><h2>{_e(ds_name)}</h2>')
        parts.append(
            f'<p class="muted">zero-shot retrieval: {_e(ds.get("num_images", "–"))} images, '
            f'{_e(ds.get("num_texts", "–"))} texts</p>'
        )
        if ds.get("examples"):
            parts.append("<h3>Examples</h3>" + _retrieval_examples(ds["examples"]))
        parts.append("</section>")

    if training_log:
        parts.append(_training_section(training_log))
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(result: dict) -> str:
    """A short summary: model, notes and the metric tables (percent, one decimal)."""
    name, checkpoint = _model_fields(result)
    lines = ["# Evaluation", "", f"- model: `{name.replace('`', '')}`" if name else "- model: –"]
    if checkpoint:
        lines.append(f"- checkpoint: `{checkpoint.replace('`', '')}`")
    for note in result.get("notes") or []:
        lines.append(f"- note: {_md(note)}")
    c_head, c_rows, r_head, r_rows = _table_rows(result)
    for heading, head, rows in (
        ("Zero-shot classification (percent)", c_head, c_rows),
        ("Zero-shot retrieval (percent)", r_head, r_rows),
    ):
        if not rows:
            continue
        lines += ["", f"## {heading}", "", "| " + " | ".join(_md(h) for h in head) + " |",
                  "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    if not (c_rows or r_rows):
        lines += ["", "No datasets were evaluated."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# KFP metrics and publishing


def kfp_metrics(result: dict) -> dict[str, float]:
    """Flat scalar metrics, ``"<dataset>/<metric>" -> float`` (fractions, as in metrics.json); non-finite dropped."""
    out: dict[str, float] = {}
    for ds_name, ds in (result.get("datasets") or {}).items():
        for metric, value in (ds.get("metrics") or {}).items():
            if _is_number(value):
                out[f"{ds_name}/{metric}"] = float(value)
    return out


def log_kfp_metrics(metrics_artifact: Any, result: dict) -> dict[str, float]:
    """Log every scalar of :func:`kfp_metrics` on a ``kfp.dsl.Metrics`` artifact; returns what was logged."""
    metrics = kfp_metrics(result)
    for key, value in metrics.items():
        metrics_artifact.log_metric(key, value)
    return metrics


def write_report(
    result: dict,
    output_prefix: str,
    training_log: str | Sequence[dict] | None = None,
    title: str = DEFAULT_TITLE,
) -> dict[str, str]:
    """Publish ``report.html`` and ``summary.md`` under ``output_prefix`` (atomic store writes); returns their URIs
    as ``{"html": ..., "markdown": ...}``. ``training_log`` is a list of dicts or a JSON-lines path / URI."""
    log = load_training_log(training_log)
    html_uri = store.join(output_prefix, "report.html")
    md_uri = store.join(output_prefix, "summary.md")
    store.put_bytes(html_uri, render_html(result, log, title=title).encode("utf-8"))
    store.put_bytes(md_uri, render_markdown(result).encode("utf-8"))
    return {"html": html_uri, "markdown": md_uri}
