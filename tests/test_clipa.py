import math

import open_clip
import pytest
import torch

from components.common import open_clip_models
from components.common.recipe import ImageTokens, Stage, TextTokens
from components.train import clipa

TINY = "clipline-tiny"


@pytest.fixture(scope="module", autouse=True)
def _registered():
    open_clip_models.register_model_configs()


def _index_tokens(batch: int, grid: tuple[int, int], width: int = 3) -> torch.Tensor:
    """Token value = patch index (the 'positional signal'); class token = -1."""
    n = grid[0] * grid[1]
    x = torch.arange(n, dtype=torch.float32)[None, :, None].expand(batch, n, width)
    cls = torch.full((batch, 1, width), -1.0)
    return torch.cat([cls, x], dim=1).clone()


def _kept(mask: clipa.TokenMask, batch: int = 16) -> torch.Tensor:
    mask.train()
    out = mask(_index_tokens(batch, mask.grid))
    assert (out[:, 0] == -1).all()  # class token kept, first
    return out[:, 1:, 0].long()


# ----------------------------------------------------------------------------------------------------------- configs


def test_register_is_idempotent_and_lists_configs():
    from open_clip import factory

    names = open_clip_models.register_model_configs()
    n_paths = len(factory._MODEL_CONFIG_PATHS)
    assert open_clip_models.register_model_configs() == names
    assert len(factory._MODEL_CONFIG_PATHS) == n_paths
    assert {TINY, "clipline-ViT-B-16-CL32", "clipline-ViT-L-16-CL32"} <= set(names)
    assert set(names) <= set(open_clip.list_models())


@pytest.mark.parametrize("name", open_clip_models.shipped_config_names())
def test_shipped_configs_load(name):
    cfg = open_clip.get_model_config(name)
    assert cfg is not None and {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg)
    if name != TINY:
        assert cfg["text_cfg"]["context_length"] == 32
        assert cfg["text_cfg"]["tokenizer_kwargs"]["reduction_mask"] == "syntax"
        tok = open_clip.get_tokenizer(name)  # CLIP BPE ships with open_clip: no download
        assert tok(["a photo of a dog"]).shape == (1, 32)


def test_tiny_creates_and_runs():
    model = open_clip.create_model(TINY)
    tok = open_clip.get_tokenizer(TINY)
    with torch.no_grad():
        img, txt, scale = model(torch.randn(2, 3, 32, 32), tok(["a cat", "a dog"]))
    assert img.shape == (2, 64) and txt.shape == (2, 64) and torch.isfinite(img).all()


def test_inline_config_resolves_to_stable_name():
    cfg = open_clip.get_model_config(TINY)
    a, b = open_clip_models.resolve_model_name(cfg), open_clip_models.resolve_model_name(dict(cfg))
    assert a == b and a.startswith("clipline-inline-")
    assert open_clip.create_model(a).visual.grid_size == (4, 4)


# ------------------------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("grid", [(8, 8), (7, 5), (2, 2)])
def test_grid_mask_keeps_one_per_2x2_window(grid):
    mask = clipa.TokenMask("grid", grid)
    kept = _kept(mask)
    rows, cols = grid
    assert kept.shape[1] == math.ceil(rows / 2) * math.ceil(cols / 2) == mask.num_kept()
    for per_image in kept:
        r, c = per_image // cols, per_image % cols
        windows = (r // 2) * math.ceil(cols / 2) + c // 2
        assert sorted(windows.tolist()) == list(range(kept.shape[1]))  # exactly one per window
    # positions vary between images (random per window per image)
    assert len({tuple(k.tolist()) for k in kept}) > 1


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.3])
def test_block_mask_keeps_one_contiguous_block(keep):
    grid = (8, 8)
    mask = clipa.TokenMask("block", grid, keep)
    kept = _kept(mask, batch=32)
    bh, bw = clipa.block_shape(grid, keep)
    assert kept.shape[1] == bh * bw == mask.num_kept()
    assert abs(bh * bw - keep * 64) <= max(bh, bw) / 2 + 1  # covers ~keep of the grid
    for per_image in kept:
        r, c = per_image // 8, per_image % 8
        assert r.max() - r.min() + 1 == bh and c.max() - c.min() + 1 == bw  # one rectangle, no holes
        assert len(set(per_image.tolist())) == bh * bw
    assert len({tuple(k.tolist()) for k in kept}) > 1  # random position per image


@pytest.mark.parametrize("keep", [0.5, 0.3, 0.9])
def test_random_mask_keeps_rounded_count(keep):
    mask = clipa.TokenMask("random", (7, 7), keep)
    kept = _kept(mask)
    assert kept.shape[1] == round(keep * 49)
    for per_image in kept:
        assert len(set(per_image.tolist())) == kept.shape[1]


@pytest.mark.parametrize("mode,keep", [("random", 0.5), ("grid", 1.0), ("block", 0.25)])
def test_masks_inactive_in_eval(mode, keep):
    mask = clipa.TokenMask(mode, (4, 4), keep).eval()
    x = _index_tokens(2, (4, 4))
    assert torch.equal(mask(x), x)


# ------------------------------------------------------------------------------------------------------------ stages


def _seq_len_seen(model, images):
    seen = []
    h = model.visual.ln_pre.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    try:
        model.encode_image(images)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize(
    "image,expected_patches",
    [
        (ImageTokens(size=16), 4),
        (ImageTokens(mask="grid"), 4),
        (ImageTokens(mask="block", keep=0.25), 4),
        (ImageTokens(mask="random", keep=0.5), 8),
        (ImageTokens(size=64, mask="grid"), 16),
    ],
)
def test_stage_model_forward(image, expected_patches):
    model = clipa.build_stage_model(TINY, image).train()
    size = image.size or 32
    x = torch.randn(3, 3, size, size)
    assert _seq_len_seen(model, x) == 1 + expected_patches
    out = model.encode_image(x)
    assert out.shape == (3, 64) and torch.isfinite(out).all()
    model.eval()
    assert _seq_len_seen(model, x) == 1 + (size // 8) ** 2  # eval: every token


def test_short_text_runs_in_stage1():
    model = clipa.build_stage_model(TINY, ImageTokens(mask="grid")).eval()
    short = open_clip.get_tokenizer(TINY, context_length=6)(["a very long caption about a small cat on a mat"])
    out = model.encode_text(short)
    assert out.shape == (1, 64) and torch.isfinite(out).all()
    # causal mask: the same text padded to the full context gives the same features (pooled at EOT)
    padded = torch.cat([short, torch.zeros(1, 10, dtype=torch.long)], dim=1)
    torch.testing.assert_close(out, model.encode_text(padded), rtol=1e-5, atol=1e-5)
    # full-length text: identical to open_clip's own encode_text
    stock = open_clip.create_model(TINY).eval()
    stock.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.encode_text(padded), stock.encode_text(padded))
    # the whole forward takes short text too
    img, txt, _ = model.train()(torch.randn(1, 3, 32, 32), short)
    assert torch.isfinite(txt).all()


def test_switch_stage_to_full_tokens_carries_weights():
    # stage 2 at full tokens: the config's own image size, no mask
    stage1 = clipa.build_stage_model(TINY, ImageTokens(size=16, mask="grid"))
    with torch.no_grad():  # make the weights distinguishable from a fresh init
        for p in stage1.parameters():
            p.add_(0.01 * torch.randn_like(p))
    stage2 = clipa.switch_stage(stage1, TINY, ImageTokens())
    assert stage2.visual.grid_size == (4, 4)
    assert isinstance(stage2.visual.patch_dropout, torch.nn.Identity)
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        if k == "visual.positional_embedding":
            assert s1[k].shape == (1 + 4, 64) and s2[k].shape == (1 + 16, 64)
            assert torch.equal(s1[k][0], s2[k][0])  # class position carried as is
        else:
            assert torch.equal(s1[k], s2[k]), k
    stage2.train()
    tok = open_clip.get_tokenizer(TINY)
    img, txt, _ = stage2(torch.randn(2, 3, 32, 32), tok(["a", "b"]))
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    # and what it saves loads into a stock open_clip model
    fresh = open_clip.create_model(TINY)
    fresh.load_state_dict(stage2.state_dict(), strict=True)


def test_token_counts():
    def stage(image=None, text=None):
        return Stage(name="s", samples=1, base_lr=1e-3, image=image or ImageTokens(), text=text or TextTokens())

    assert clipa.token_counts(TINY, stage()) == (16, 16)
    assert clipa.token_counts(TINY, stage(ImageTokens(size=16), TextTokens(length=8))) == (4, 8)
    assert clipa.token_counts(TINY, stage(ImageTokens(mask="grid"))) == (4, 16)
    b16 = "clipline-ViT-B-16-CL32"
    assert clipa.token_counts(b16, stage()) == (196, 32)
    assert clipa.token_counts(b16, stage(ImageTokens(size=112), TextTokens(length=16, mask="syntax"))) == (49, 16)
    assert clipa.token_counts(b16, stage(ImageTokens(mask="random", keep=0.25))) == (49, 32)
    assert clipa.token_counts(b16, stage(ImageTokens(mask="block", keep=0.25))) == (49, 32)  # 7x7 block
    assert clipa.token_counts(open_clip.get_model_config(b16), stage(ImageTokens(mask="grid"))) == (49, 32)
