"""Perceiver Resampler: any number of visual features -> a fixed 64 visual tokens.

Per media item (an image is a one-frame video): frame features [T, S, Dv] get a
learned temporal embedding per frame (no spatial position encoding, as the
paper; `frame_embedding=False` drops it, as OpenFlamingo's released models),
optionally a learned embedding of the item's media slot (`media_positions`, as
OpenFlamingo's `media_time_embs`), are flattened to T*S tokens, and a set of
learned latents attends to them. Each layer is

    x = x + attn(q=x, kv=concat(features, x));   x = x + ffw(x)

Everything here is trainable. When the encoder's width differs from the
Resampler's (NFNet-F6 with its final conv gives 3072 vs 1536) a trainable
linear projection maps the features first; with it the 3B/9B/80B Resampler has
the paper's 194M parameters.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.attention import attention
from flamingo_jax.models.config import ResamplerConfig

Array = jax.Array


def interpolate_frames(table: Array, num_frames: int) -> Array:
    """Temporal embeddings [F, D] for `num_frames` frames.

    Up to F frames use the first rows; more frames than seen in training are
    linearly interpolated over the learned rows (paper: 8 frames in training,
    30 at inference)."""
    trained = table.shape[0]
    if num_frames <= trained:
        return table[:num_frames]
    return jax.image.resize(table, (num_frames, table.shape[1]), method="linear")


class ResamplerLayer(nnx.Module):
    def __init__(self, cfg: ResamplerConfig, *, dtype, param_dtype, rngs: nnx.Rngs,
                 attention_implementation: str = "xla"):
        self.attention_implementation = attention_implementation
        kw = dict(variable_type=nnx.Param, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        norm_kw = dict(axis_name="media_embed", variable_type=nnx.Param, rngs=rngs, param_dtype=param_dtype)
        self.media_norm = layers.LayerNorm(cfg.dim, **norm_kw)
        self.latent_norm = layers.LayerNorm(cfg.dim, **norm_kw)
        heads = (cfg.num_heads, cfg.head_dim)
        self.query = layers.Dense(cfg.dim, heads, axes=("media_embed", "heads", "kv"), **kw)
        self.key = layers.Dense(cfg.dim, heads, axes=("media_embed", "heads", "kv"), **kw)
        self.value = layers.Dense(cfg.dim, heads, axes=("media_embed", "heads", "kv"), **kw)
        self.out = layers.Dense(heads, cfg.dim, axes=("heads", "kv", "media_embed"), **kw)
        self.ffw_norm = layers.LayerNorm(cfg.dim, **norm_kw)
        self.ffw = layers.FeedForward(cfg.dim, cfg.ffw_mult * cfg.dim, activation=cfg.activation, **kw)

    def __call__(self, latents: Array, features: Array) -> Array:
        """latents [B, R, D], features [B, S, D] -> [B, R, D]."""
        x = self.latent_norm(latents)
        kv_input = jnp.concatenate([self.media_norm(features), x], axis=1)  # [B, S+R, D]
        attended = attention(self.query(x), self.key(kv_input), self.value(kv_input),
                             implementation=self.attention_implementation)
        latents = latents + self.out(attended)
        return latents + self.ffw(self.ffw_norm(latents))


class PerceiverResampler(nnx.Module):
    def __init__(self, cfg: ResamplerConfig, *, media_dim: int, num_frames: int, dtype, param_dtype,
                 remat_policy: str = "none", attention_implementation: str = "xla", rngs: nnx.Rngs):
        self.dtype = dtype
        self.remat_policy = remat_policy
        self.input_projection = (
            layers.Dense(media_dim, cfg.dim, axes=("vision_embed", "media_embed"), variable_type=nnx.Param,
                         rngs=rngs, param_dtype=param_dtype, dtype=dtype)
            if media_dim != cfg.dim else None
        )
        normal = nnx.initializers.normal(0.02)
        self.temporal_embedding = layers.make_variable(
            nnx.Param, normal, rngs.params(), (num_frames, cfg.dim), param_dtype, ("frames", "media_embed")
        ) if cfg.frame_embedding else None
        self.media_position_embedding = layers.make_variable(
            nnx.Param, normal, rngs.params(), (cfg.media_positions, cfg.dim), param_dtype, ("media", "media_embed")
        ) if cfg.media_positions else None
        self.latents = layers.make_variable(
            nnx.Param, normal, rngs.params(), (cfg.num_latents, cfg.dim), param_dtype, ("latents", "media_embed"))
        self.layers = layers.stack_modules(
            lambda r: ResamplerLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r,
                                     attention_implementation=attention_implementation),
            cfg.num_layers, rngs)
        self.final_norm = layers.LayerNorm(cfg.dim, axis_name="media_embed", variable_type=nnx.Param, rngs=rngs,
                                           param_dtype=param_dtype)

    def __call__(self, features: Array) -> Array:
        """Frame features [B, M, T, S, Dv] -> visual tokens [B, M, R, D]."""
        chex.assert_rank(features, 5)
        batch, num_media, num_frames, num_patches, _ = features.shape
        x = features.astype(self.dtype)
        if self.input_projection is not None:
            x = self.input_projection(x)
        if self.temporal_embedding is not None:
            x = x + interpolate_frames(self.temporal_embedding[...], num_frames).astype(self.dtype)[:, None, :]
        if self.media_position_embedding is not None:
            rows = self.media_position_embedding.shape[0]
            if num_media > rows:
                raise ValueError(f"{num_media} media slots but the Resampler's media-position table has {rows} "
                                 "rows (model.resampler.media_positions); pass at most that many media per example.")
            x = x + self.media_position_embedding[:num_media].astype(self.dtype)[:, None, None, :]
        x = x.reshape(batch * num_media, num_frames * num_patches, x.shape[-1])
        latents = jnp.broadcast_to(self.latents[...].astype(self.dtype), (x.shape[0],) + self.latents.shape)

        graphdef, state = nnx.split(self.layers)
        latents, _ = layers.scan_stack(
            graphdef, state, lambda layer, lat, _: (layer(lat, x), None), latents, remat_policy=self.remat_policy)
        out = self.final_norm(latents)
        return out.reshape(batch, num_media, out.shape[1], out.shape[2])
