"""The dual encoder that pretrains Flamingo's vision encoder contrastively (appendix B.1.3).

    image -> vision encoder (the one Flamingo will freeze) -> mean over its spatial
             tokens (and a video's frames) -> linear -> L2-normalise
    text  -> BERT-style text encoder -> mean over its tokens -> linear -> L2-normalise

and a learnable inverse temperature scales their cosine similarities into the
logits of the two-term contrastive loss (`training.objectives`). After
pretraining only `vision_encoder` is kept: its weights are exactly the layout
a Flamingo with the same vision config restores (`core.backbones`).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.config import FlamingoConfig, TextEncoderConfig
from flamingo_jax.models.flamingo import build_vision_encoder
from flamingo_jax.models.text_encoder import TextEncoder

Array = jax.Array


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


class DualEncoder(nnx.Module):
    def __init__(self, cfg: FlamingoConfig, text: TextEncoderConfig, vocab_size: int, *,
                 initial_inverse_temperature: float = 10.0, rngs: nnx.Rngs):
        dtype, _, param_dtype = cfg.dtypes()  # everything here trains: the trainable dtype
        self.dtype = dtype
        # Both towers train here: `cfg.remat_policy` applies to their scanned blocks.
        self.vision_encoder = build_vision_encoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                                   remat_policy=cfg.remat_policy)
        self.image_projection = layers.Dense(self.vision_encoder.out_dim, text.embed_dim,
                                             axes=("vision_embed", "joint_embed"), variable_type=layers.Frozen,
                                             rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.text_encoder = TextEncoder(text, vocab_size, dtype=dtype, param_dtype=param_dtype,
                                        attention_implementation=cfg.attention, remat_policy=cfg.remat_policy,
                                        rngs=rngs)
        self.log_inverse_temperature = layers.make_variable(
            layers.Frozen, layers.constant_init(math.log(initial_inverse_temperature)), None, (), param_dtype, ())

    def embed_media(self, media: Array) -> Array:
        """Media [B, T, H, W, 3] (an image is one frame) -> unit embeddings [B, E]: each frame's
        spatial tokens and then the frames are mean-pooled ("frames pooled", the paper's video)."""
        chex.assert_rank(media, 5)
        b, t = media.shape[:2]
        features = self.vision_encoder(media.reshape(b * t, *media.shape[2:]).astype(self.dtype))  # [BT, S, Dv]
        pooled = jnp.mean(features.astype(jnp.float32).reshape(b, -1, features.shape[-1]), axis=1)
        return l2_normalize(self.image_projection(pooled.astype(self.dtype)))

    def embed_text(self, tokens: Array, valid: Array) -> Array:
        """tokens [B, T] (valid where `valid`) -> unit embeddings [B, E]."""
        return l2_normalize(self.text_encoder(tokens, valid))

    def similarity_logits(self, media: Array, tokens: Array, valid: Array) -> Array:
        """[B, B] logits: row i scores image i against every text; the diagonal pairs match."""
        scale = jnp.exp(self.log_inverse_temperature[...].astype(jnp.float32))
        return scale * self.embed_media(media) @ self.embed_text(tokens, valid).T
