"""CLIP-style vision transformer, frozen: images -> patch tokens.

The alternative to NFNet-F6 (OpenFlamingo uses a CLIP ViT-L/14). The layout is
CLIP's (Radford et al. 2021, open_clip `VisionTransformer`):

    patches -> linear patch embedding (no bias) -> [class; patches] + positions
    -> ln_pre -> L pre-LN residual blocks -> ln_post (on every token)

and the class token is dropped from the output: Flamingo's Resampler reads the
patch grid, [B, (image_size/patch)^2, width]. CLIP's final projection `proj`
maps only the pooled class token into the joint text-image space; it is not
part of this encoder. HF CLIP's `last_hidden_state` is the same grid without
ln_post (its post_layernorm normalises the pooled class token only):
`ViTConfig.norm_output=False` returns that, and the encoder has no ln_post.

Every weight is `layers.Frozen`. The blocks are stacked on a leading 'layers'
axis and run with `layers.scan_stack`, so depth does not grow the program.

Weights map one-to-one to open_clip (`visual.` prefix) and HF CLIP
(`vision_model.` prefix); torch Linear weights [out, in] are transposed, and
the L per-block tensors are stacked on axis 0:

    patch_embed.kernel [p, p, 3, W]     conv1.weight [W, 3, p, p].transpose(2, 3, 1, 0)
                                        | embeddings.patch_embedding.weight (same)
    class_embedding [W]                 class_embedding | embeddings.class_embedding
    positional_embedding [1+N, W]       positional_embedding | embeddings.position_embedding.weight
    ln_pre.{scale,bias}                 ln_pre.{weight,bias} | pre_layrnorm.{weight,bias}
    blocks.ln_1.{scale,bias}            transformer.resblocks.i.ln_1 | encoder.layers.i.layer_norm1
    blocks.query.kernel [W, H, Dh]      attn.in_proj_weight[:W].T.reshape(W, H, Dh) | self_attn.q_proj.weight.T
    blocks.key / blocks.value           rows W:2W / 2W:3W of in_proj_weight (and in_proj_bias) | k_proj / v_proj
    blocks.{query,key,value}.bias [H, Dh]
    blocks.out.kernel [H, Dh, W]        attn.out_proj.weight.T.reshape(H, Dh, W) | self_attn.out_proj
    blocks.ln_2.{scale,bias}            ln_2 | layer_norm2
    blocks.mlp.wi.{kernel,bias}         mlp.c_fc | mlp.fc1
    blocks.mlp.wo.{kernel,bias}         mlp.c_proj | mlp.fc2
    ln_post.{scale,bias}                ln_post | post_layernorm (only with norm_output)

OpenAI CLIP checkpoints use `activation='quick_gelu'`; open_clip models trained
with torch's erf GELU match `activation='gelu_exact'` exactly ('gelu' is the tanh
approximation). The two tables live in `flamingo_jax/convert/` (open_clip_vit.py,
hf_clip.py).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.attention import attention
from flamingo_jax.models.config import ViTConfig

Array = jax.Array


class ViTBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: ViTConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                 attention_implementation: str = "xla"):
        self.attention_implementation = attention_implementation
        width, heads = cfg.width, cfg.num_heads
        head_shape = (heads, width // heads)
        kw = dict(variable_type=layers.Frozen, rngs=rngs, param_dtype=param_dtype, dtype=dtype, use_bias=True)
        norm_kw = dict(axis_name="embed", variable_type=layers.Frozen, rngs=rngs, param_dtype=param_dtype,
                       eps=cfg.norm_eps)
        self.ln_1 = layers.LayerNorm(width, **norm_kw)
        self.query = layers.Dense(width, head_shape, axes=("embed", "heads", "kv"), **kw)
        self.key = layers.Dense(width, head_shape, axes=("embed", "heads", "kv"), **kw)
        self.value = layers.Dense(width, head_shape, axes=("embed", "heads", "kv"), **kw)
        self.out = layers.Dense(head_shape, width, axes=("heads", "kv", "embed"), **kw)
        self.ln_2 = layers.LayerNorm(width, **norm_kw)
        self.mlp = layers.FeedForward(width, int(width * cfg.mlp_ratio), activation=cfg.activation, **kw)

    def __call__(self, x: Array) -> Array:
        """x [B, T, W] -> [B, T, W]; every token attends to every token."""
        h = self.ln_1(x)
        attended = attention(self.query(h), self.key(h), self.value(h),  # q, k, v: [B, T, H, Dh]
                             implementation=self.attention_implementation)
        x = x + self.out(attended)
        return x + self.mlp(self.ln_2(x))


class ViT(nnx.Module):
    """images [B, S, S, 3] (S = image_size, CLIP-normalised) -> patch tokens [B, (S/p)^2, width].

    With `cfg.include_class_token` a learned class token is prepended (as CLIP,
    so its checkpoints load) and dropped from the output; without it the
    encoder sees only patch tokens. `cfg.norm_output` applies ln_post to them.
    """

    def __init__(self, cfg: ViTConfig, image_size: int, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, attention_implementation: str = "xla",
                 remat_policy: str = "none"):
        if image_size % cfg.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {cfg.patch_size}.")
        if cfg.width % cfg.num_heads:
            raise ValueError(f"ViT width {cfg.width} is not a multiple of num_heads {cfg.num_heads}.")
        if cfg.activation not in layers.ACTIVATIONS:
            raise ValueError(f"unknown activation {cfg.activation!r}; choose one of {sorted(layers.ACTIVATIONS)}")
        self.image_size, self.patch_size, self.dtype = image_size, cfg.patch_size, dtype
        self.remat_policy = remat_policy  # of the scanned blocks: only a trained ViT (contrastive) needs one
        self.out_dim = cfg.width
        p, width = cfg.patch_size, cfg.width
        self.num_patches = (image_size // p) ** 2
        self.num_prefix = 1 if cfg.include_class_token else 0
        # CLIP initialises the embeddings with std width^-0.5.
        embed_init = nnx.initializers.normal(width**-0.5)
        self.patch_embed = layers.Dense((p, p, 3), width, axes=("conv_h", "conv_w", "conv_in", "embed"),
                                        variable_type=layers.Frozen, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.class_embedding = (
            layers.make_variable(layers.Frozen, embed_init, rngs.params(), (width,), param_dtype, ("embed",))
            if cfg.include_class_token else None
        )
        self.positional_embedding = layers.make_variable(
            layers.Frozen, embed_init, rngs.params(), (self.num_prefix + self.num_patches, width), param_dtype,
            ("vit_positions", "embed"))
        norm_kw = dict(axis_name="embed", variable_type=layers.Frozen, rngs=rngs, param_dtype=param_dtype,
                       eps=cfg.norm_eps)
        self.ln_pre = layers.LayerNorm(width, **norm_kw)
        self.blocks = layers.stack_modules(
            lambda r: ViTBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r,
                               attention_implementation=attention_implementation),
            cfg.num_layers, rngs)
        self.ln_post = layers.LayerNorm(width, **norm_kw) if cfg.norm_output else None

    def patchify(self, images: Array) -> Array:
        """[B, S, S, 3] -> non-overlapping patches [B, N, p, p, 3], row-major over the grid."""
        chex.assert_rank(images, 4)
        chex.assert_axis_dimension(images, 3, 3)
        batch, height, width, channels = images.shape
        if height != self.image_size or width != self.image_size:
            raise ValueError(f"ViT was built for {self.image_size}x{self.image_size} images (its positional "
                             f"embedding has one row per patch), got {height}x{width}.")
        p, g = self.patch_size, self.image_size // self.patch_size
        x = images.reshape(batch, g, p, g, p, channels).transpose(0, 1, 3, 2, 4, 5)  # [B, g, g, p, p, 3]
        return x.reshape(batch, g * g, p, p, channels)

    def __call__(self, images: Array) -> Array:
        """images [B, S, S, 3] -> patch tokens [B, N, width]."""
        x = self.patch_embed(self.patchify(images.astype(self.dtype)))  # [B, N, W], = CLIP's strided conv
        if self.class_embedding is not None:
            cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)  # [B, 1+N, W]
        x = self.ln_pre(x + self.positional_embedding[...].astype(self.dtype))

        graphdef, state = nnx.split(self.blocks)
        x, _ = layers.scan_stack(graphdef, state, lambda block, h, _: (block(h), None), x,
                                 remat_policy=self.remat_policy)
        x = x[:, self.num_prefix:]  # [B, N, W]: class token dropped
        return x if self.ln_post is None else self.ln_post(x)
