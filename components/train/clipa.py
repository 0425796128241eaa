"""CLIPA (Li et al. 2023, "An Inverse Scaling Law for CLIP Training") on open_clip models.

Stage 1 trains at reduced tokens (a smaller image and/or an image patch mask; a shorter text), stage 2 finetunes at
full tokens. This module owns the model side of that:

* the model configs shipped in ``components/common/model_configs/`` (upstream open_clip deleted the CLIPA
  configs its own scripts used; ``components.common.open_clip_models`` registers them). ``clipline-tiny`` is a toy
  model for tests and the demo; ``clipline-ViT-B-16-CL32`` and
  ``clipline-ViT-L-16-CL32`` follow CLIPA's vision tower (global average pooling, no ``ln_pre``, LN after pooling, as in
  open_clip's ViT-L-14-CLIPA config) with CLIPA's 32-token text context. They use open_clip's own CLIP BPE tokenizer
  (shipped in the wheel, no hub download) instead of CLIPA's bert-base-uncased, and so keep open_clip's default text
  pooling (argmax = the EOT token, causal mask): CLIPA's ``pool_type: last`` + ``no_causal_mask`` is only right with its
  bert tokenizer. ``text_cfg.tokenizer_kwargs.reduction_mask = "syntax"`` is CLIPA's best text mask.
* ``build_stage_model()`` / ``apply_image_tokens()``: the image side of a stage (resize via ``force_image_size``, and a
  ``TokenMask`` in place of the ViT's ``patch_dropout``).
* ``switch_stage()``: the stage-1 -> stage-2 switch (weights carried, positional
  embedding resized with open_clip's ``resize_pos_embed``). Objective/optimizer state is the trainer's business.
* ``token_counts()``: (image tokens, text tokens) of a stage, for the token-count ratio of a benchmark.

The text side of a stage is the tokenizer's (``open_clip.get_tokenizer(name, context_length=L,
reduction_mask=...)``). open_clip's ``CLIP.encode_text`` only takes full-context text, so stage models get
``allow_short_text()`` (positions and causal mask sliced to the text's length).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, get_args

import torch
from torch import nn

from components.common.open_clip_models import model_config, resolve_model_name, tower_sizes
from components.common.recipe import ImageMask, ImageTokens, Stage

MaskMode = ImageMask


# ---------------------------------------------------------------------------------------------------------- image masks


def mask_keep_count(mode: MaskMode, grid: tuple[int, int], keep: float = 1.0) -> int:
    """How many patch tokens a mask keeps on a (rows, cols) patch grid (the class token not counted)."""
    rows, cols = grid
    n = rows * cols
    if mode == "none":
        return n
    if mode == "random":
        return max(1, min(n, round(keep * n)))
    if mode == "grid":
        return math.ceil(rows / 2) * math.ceil(cols / 2)
    if mode == "block":
        bh, bw = block_shape(grid, keep)
        return bh * bw
    raise ValueError(f"unknown image mask {mode!r}")


def block_shape(grid: tuple[int, int], keep: float) -> tuple[int, int]:
    """The (rows, cols) of the block mask: as square as the grid allows, covering about ``keep`` of it.

    The height is round(rows * sqrt(keep)) and the width then the closest to keep * N / height, so the block has the
    grid's aspect ratio and round-off error of at most half a row or column.
    """
    rows, cols = grid
    n = rows * cols
    target = max(1, round(keep * n))
    bh = min(rows, max(1, round(rows * math.sqrt(keep))))
    bw = min(cols, max(1, round(target / bh)))
    return bh, bw


class TokenMask(nn.Module):
    """Keeps a subset of the patch tokens (and always the class token), in training mode only.

    It takes the place of open_clip's ``PatchDropout`` in ``VisionTransformer`` (``model.visual.patch_dropout``), so it
    runs after the patch embedding and the positional embedding were added: each kept token still carries its position,
    and the transformer simply sees a shorter sequence. It has no parameters, so state dicts (checkpoints) are the
    same with or without it and the final model loads into a plain ``open_clip.create_model``. In eval mode it is the
    identity: evaluation always sees every token.

    Modes (the CLIPA paper's section 3, image token reduction):

    * ``random``: keeps round(keep * N) patches chosen uniformly per image (FLIP / PatchDropout; CLIPA's "random
      masking"). Open_clip's ``PatchDropout`` keeps int(N * keep); this one rounds, so token counts match the recipe.
    * ``grid``: splits the patch grid into 2x2 windows and keeps one patch per window, at a random position per window
      and per image (1/4 of the tokens). Every region of the image stays represented at half the resolution, which is
      why CLIPA found it close to resizing. Windows cut by an odd grid edge pick inside the part that exists.
    * ``block``: keeps one contiguous rectangle of patches covering about ``keep`` of the grid (see ``block_shape``)
      at a random position per image: local structure intact, the rest of the image dropped (CLIPA's "block masking").
    """

    def __init__(self, mode: MaskMode, grid: tuple[int, int], keep: float = 1.0, exclude_first_token: bool = True):
        super().__init__()
        if mode not in get_args(ImageMask):
            raise ValueError(f"unknown image mask {mode!r}")
        if mode in ("random", "block") and not 0.0 < keep < 1.0:
            raise ValueError(f"mask {mode!r} needs 0 < keep < 1, got {keep}")
        self.mode = mode
        self.grid = (int(grid[0]), int(grid[1]))
        self.keep = float(keep)
        self.exclude_first_token = exclude_first_token

    def extra_repr(self) -> str:
        return f"mode={self.mode}, grid={self.grid}, keep={self.keep}"

    def num_kept(self) -> int:
        return mask_keep_count(self.mode, self.grid, self.keep)

    def patch_indices(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(batch, kept) indices into the flattened row-major patch grid, ascending per row."""
        rows, cols = self.grid
        n = rows * cols
        if self.mode == "none":
            return torch.arange(n, device=device).expand(batch, n)
        if self.mode == "random":
            k = self.num_kept()
            idx = torch.rand(batch, n, device=device).topk(k, dim=-1).indices
            return idx.sort(dim=-1).values
        if self.mode == "grid":
            wr, wc = math.ceil(rows / 2), math.ceil(cols / 2)
            r0 = torch.arange(wr, device=device) * 2  # window top rows
            c0 = torch.arange(wc, device=device) * 2
            hr = (rows - r0).clamp(max=2)  # rows of each window that exist (1 at an odd edge)
            hc = (cols - c0).clamp(max=2)
            dr = (torch.rand(batch, wr, wc, device=device) * hr[None, :, None]).floor().long()
            dc = (torch.rand(batch, wr, wc, device=device) * hc[None, None, :]).floor().long()
            r = r0[None, :, None] + dr
            c = c0[None, None, :] + dc
            return (r * cols + c).reshape(batch, wr * wc)
        bh, bw = block_shape(self.grid, self.keep)
        top = torch.randint(0, rows - bh + 1, (batch,), device=device)
        left = torch.randint(0, cols - bw + 1, (batch,), device=device)
        r = top[:, None, None] + torch.arange(bh, device=device)[None, :, None]
        c = left[:, None, None] + torch.arange(bw, device=device)[None, None, :]
        return (r * cols + c).reshape(batch, bh * bw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.mode == "none":
            return x
        if self.exclude_first_token:
            cls_tokens, patches = x[:, :1], x[:, 1:]
        else:
            cls_tokens, patches = None, x
        if patches.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError(f"TokenMask built for a {self.grid} grid got {patches.shape[1]} patch tokens")
        idx = self.patch_indices(x.shape[0], x.device)
        patches = torch.gather(patches, 1, idx[..., None].expand(-1, -1, patches.shape[-1]))
        return patches if cls_tokens is None else torch.cat((cls_tokens, patches), dim=1)


# --------------------------------------------------------------------------------------------------------- stage models


def _grid_size(model: nn.Module) -> tuple[int, int]:
    visual = getattr(model, "visual", None)
    grid = getattr(visual, "grid_size", None)
    if grid is None or not hasattr(visual, "patch_dropout"):
        raise TypeError("image token masks need an open_clip VisionTransformer tower (model.visual.patch_dropout)")
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def apply_image_tokens(model: nn.Module, image: ImageTokens) -> nn.Module:
    """Set the image mask of ``image`` (an ImageTokens: mask, keep) on a built model, in place.

    The size must already be the model's (``build_stage_model`` does both). ``mask: none`` restores the identity.
    """
    if image.mask == "none":
        if hasattr(getattr(model, "visual", None), "patch_dropout"):
            model.visual.patch_dropout = nn.Identity()
        return model
    model.visual.patch_dropout = TokenMask(image.mask, _grid_size(model), image.keep)
    return model


def build_stage_model(model: str | Mapping[str, Any] | Any, image: ImageTokens | None = None,
                      **create_kwargs: Any) -> nn.Module:
    """An open_clip model for a stage: built at the stage's image size with its image mask.

    ``model``: a config name, an inline config dict or a ModelSpec. ``image``: the stage's ImageTokens (None: full
    tokens). The model also takes text shorter than its context (``allow_short_text``). Extra keyword arguments
    go to ``open_clip.create_model`` (precision, device, output_dict, ...).
    A smaller ``image.size`` uses ``force_image_size``: same weights shapes except the positional embedding.
    """
    import open_clip

    name = resolve_model_name(model)
    if image is not None and image.size is not None:
        create_kwargs["force_image_size"] = image.size
    built = allow_short_text(open_clip.create_model(name, **create_kwargs))
    if image is not None:
        apply_image_tokens(built, image)
    return built


def switch_stage(
    model_prev: nn.Module,
    model: str | Mapping[str, Any] | Any,
    image: ImageTokens | None = None,
    **create_kwargs: Any,
) -> nn.Module:
    """A model for the next stage carrying every weight of ``model_prev``.

    The new model is built at the new stage's image size (``image.size``, None = the config's) with its mask; the
    visual positional embedding is resized with open_clip's ``resize_pos_embed`` (bicubic, as its checkpoint loader
    does). Everything else is copied as is (strict load), and frozen parameters stay frozen. The new model is on
    ``model_prev``'s device and dtype unless ``create_kwargs`` say otherwise.
    """
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    ref = next(model_prev.parameters())
    create_kwargs.setdefault("device", ref.device)
    new = build_stage_model(model, image, **create_kwargs)
    state = {k: v.detach().clone() for k, v in model_prev.state_dict().items()}
    resize_pos_embed(state, new)
    resize_text_pos_embed(state, new)
    new.load_state_dict(state, strict=True)
    frozen = {name for name, p in model_prev.named_parameters() if not p.requires_grad}
    for name, p in new.named_parameters():
        p.requires_grad_(name not in frozen)  # e.g. a constant temperature stays constant
    return new.to(device=ref.device, dtype=ref.dtype) if "precision" not in create_kwargs else new


# --------------------------------------------------------------------------------------------------------- token counts


def token_counts(model_cfg: str | Mapping[str, Any] | Any, stage: Stage) -> tuple[int, int]:
    """(image tokens, text tokens) a stage feeds the towers per sample.

    Image tokens are patch tokens (the class token not counted), after the mask: (size / patch)^2 at the stage's size,
    reduced by the mask. Text tokens are the stage's text length (None = the config's context length).
    ``model_cfg``: an open_clip config dict, a config name or a ModelSpec.
    """
    cfg = model_cfg if isinstance(model_cfg, Mapping) and "vision_cfg" in model_cfg else model_config(model_cfg)
    sizes = tower_sizes(cfg)
    side = stage.image_size(sizes.image_size)
    grid = (side // sizes.patch_size, side // sizes.patch_size)
    image_tokens = mask_keep_count(stage.image.mask, grid, stage.image.keep)
    return image_tokens, min(stage.text_length(sizes.context_length), sizes.context_length)


# ----------------------------------------------------------------------------------------------------------- short text


def _encode_text_any_length(self: nn.Module, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` for a text shorter than the context: positions and causal mask sliced."""
    from open_clip.transformer import text_global_pool
    from torch.nn import functional as F

    seq_len = text.shape[1]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype)
    x = x + self.positional_embedding[:seq_len].to(cast_dtype)
    attn_mask = self.attn_mask[:seq_len, :seq_len] if self.attn_mask is not None else None
    x = self.transformer(x, attn_mask=attn_mask)
    x = self.ln_final(x)
    x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def allow_short_text(model: nn.Module) -> nn.Module:
    """Let a model take text shorter than its context length (CLIPA stage 1's reduced text tokens), in place.

    open_clip 3.3's ``CLIP.encode_text`` adds the whole positional embedding and the whole causal mask, so a text
    of length L < context_length fails; padding it back to the context would waste the saving. This binds a version
    that slices both to L (for full-length text it computes the same as open_clip's). No parameter changes, so the
    state dict is unaffected. Models whose text tower is a separate module (CustomTextCLIP) are left as they are.
    """
    from open_clip.model import CLIP

    if isinstance(model, CLIP):
        model.encode_text = _encode_text_any_length.__get__(model)
    return model
