"""benchmarks/gpu.py: its FLOP count against torch's FlopCounterMode, the peak table, and its --quick CPU run, so the
GPU script keeps working on a machine without a GPU. Its figures are measurements, not behaviour: only their
presence and sign are checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu import forward_flops, peak_flops, train_flops  # noqa: E402

from components.train.clipa import build_stage_model  # noqa: E402

# Not the tiny benchmark model: mlp ratio, patch count, widths and context all differ between the towers, so a
# formula that mixed them up would fail.
CONFIG = dict(embed_dim=48,
              vision_cfg=dict(image_size=48, layers=2, width=64, patch_size=12, head_width=32, mlp_ratio=2.0),
              text_cfg=dict(context_length=20, vocab_size=1000, width=32, heads=2, layers=3))
BATCH = 3


def counted(train: bool) -> int:
    torch.manual_seed(0)
    model = build_stage_model(CONFIG, output_dict=True)
    images, texts = torch.randn(BATCH, 3, 48, 48), torch.randint(0, 1000, (BATCH, 20))
    # The math attention backend decomposes into matmuls that the counter sees; the CPU's fused attention kernel is
    # not in its table, while the GPU's are.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(images, texts)
        if train:
            (out["image_features"].sum() + out["text_features"].sum()).backward()
    return counter.get_total_flops()


def test_forward_flops_equal_the_flop_counter():
    assert forward_flops(CONFIG) * BATCH == pytest.approx(counted(train=False), rel=1e-3)


def test_train_flops_are_three_forwards_less_the_image_gradient_nobody_computes():
    # The backward computes no gradient of the images (the patch embedding's input), which the 3x convention
    # counts: one patch embedding's forward FLOPs per sample (on ViT-B/16 about 1 % of the image tower's).
    patches, patch_inputs, width = (48 // 12) ** 2, 3 * 12 * 12, 64
    image_gradient = 2 * patches * patch_inputs * width * BATCH
    assert train_flops(CONFIG, BATCH) - image_gradient == pytest.approx(counted(train=True), rel=1e-3)


@pytest.mark.parametrize(("name", "label", "tflops"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989),
    ("NVIDIA H200", "H200 SXM", 989),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756),
    ("NVIDIA GeForce RTX 3060", None, None),
])
def test_peak_by_device_name(name, label, tflops):
    peak = peak_flops(name)
    assert (peak is None) if label is None else (peak == (label, tflops * 1e12))


@pytest.mark.slow
def test_quick_run_writes_every_section_with_positive_figures(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--quick", "--profile", "--json",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert "benchmarks/gpu.py --quick" in figures["command"] and figures["command"] in proc.stdout
    sections = figures["sections"]
    assert set(sections) == {"data", "mfu", "trainer", "objectives", "loader"}
    assert all(section["wall_s"] > 0 for section in sections.values())
    for mode in ("eager", "compiled"):
        assert sections["mfu"][mode]["step_s"] > 0 and sections["mfu"][mode]["tflop_per_s"] > 0
        assert sections["mfu"][mode]["mfu"] is None  # a CPU has no peak in the table
    assert sections["trainer"]["ratio"] > 0
    assert sections["trainer"]["clipline"]["samples_per_s"] > 0
    assert sections["trainer"]["open_clip_train"]["samples_per_s"] > 0
    for rows in sections["objectives"]["batches"].values():
        assert set(rows) == {"clip", "clip (control)", "siglip", "fastclip-v3", "amorlip-log_l2"}
        assert all(row["step_s"] > 0 and row["peak_gpu_mb"] >= 0 for row in rows.values())
    assert all(rate > 0 for rate in sections["loader"]["samples_per_s"].values())
    assert sections["loader"]["ratio"] > 0
    assert len(figures["floors"]) == 4
    # --quick profiles every floor's case, met or not, so that the profiling code runs here too
    assert {floor["label"] for floor in figures["floors"]} == set(figures["profiles"])
    assert 0 <= figures["profiles"][figures["floors"][0]["label"]]["loader_wait_share"] < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_train_step_on_the_gpu_makes_no_host_sync():
    from gpu import FULL, OVERHEAD_CASES, config_of, host_syncs, step_settings

    step = step_settings(FULL, config_of("tiny"))
    assert {name: host_syncs(spec, 64, step) for name, spec in OVERHEAD_CASES.items()} == dict.fromkeys(
        OVERHEAD_CASES, "none")
