"""The text tower of the vision encoder's contrastive pretraining (paper, appendix B.1.3).

A BERT-style bidirectional Transformer: token and learned position embeddings,
pre-LN blocks where every text token attends to every other (padding masked),
a final LayerNorm; the tokens' states are mean-pooled over the text and
projected into the joint embedding space (1376-d in the paper), where the
contrastive loss compares them with the pooled image features. It exists only
to pretrain the vision encoder: Flamingo itself never uses it.

Weights are `layers.Frozen`-typed like every backbone weight, but the
contrastive objective trains all of them (its `ModelParts` trains every variable).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.attention import attention
from flamingo_jax.models.config import TextEncoderConfig

Array = jax.Array


class TextBlock(nnx.Module):
    """Pre-LN block: x + attn(ln_1(x)) over the valid tokens, then x + mlp(ln_2(x))."""

    def __init__(self, cfg: TextEncoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs,
                 attention_implementation: str = "xla"):
        self.attention_implementation = attention_implementation
        heads = (cfg.num_heads, cfg.head_dim)
        kw = dict(variable_type=layers.Frozen, rngs=rngs, param_dtype=param_dtype, dtype=dtype, use_bias=True)
        norm_kw = dict(axis_name="embed", variable_type=layers.Frozen, rngs=rngs, param_dtype=param_dtype)
        self.ln_1 = layers.LayerNorm(cfg.dim, **norm_kw)
        self.query = layers.Dense(cfg.dim, heads, axes=("embed", "heads", "kv"), **kw)
        self.key = layers.Dense(cfg.dim, heads, axes=("embed", "heads", "kv"), **kw)
        self.value = layers.Dense(cfg.dim, heads, axes=("embed", "heads", "kv"), **kw)
        self.out = layers.Dense(heads, cfg.dim, axes=("heads", "kv", "embed"), **kw)
        self.ln_2 = layers.LayerNorm(cfg.dim, **norm_kw)
        self.mlp = layers.FeedForward(cfg.dim, cfg.mlp_ratio * cfg.dim, activation="gelu_exact", **kw)

    def __call__(self, x: Array, valid: Array) -> Array:
        """x [B, T, D], valid bool [B, T] -> [B, T, D]."""
        h = self.ln_1(x)
        attended = attention(self.query(h), self.key(h), self.value(h), mask=valid[:, None, None, :],
                             implementation=self.attention_implementation)
        x = x + self.out(attended)
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nnx.Module):
    """tokens [B, T] with `valid` [B, T] -> one embedding per text [B, embed_dim] (not normalised)."""

    def __init__(self, cfg: TextEncoderConfig, vocab_size: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_implementation: str = "xla", remat_policy: str = "none", rngs: nnx.Rngs):
        self.cfg, self.dtype, self.remat_policy = cfg, dtype, remat_policy
        init = nnx.initializers.normal(cfg.dim ** -0.5)
        self.token_embedding = layers.make_variable(layers.Frozen, init, rngs.params(), (vocab_size, cfg.dim),
                                                    param_dtype, ("vocab", "embed"))
        self.position_embedding = layers.make_variable(layers.Frozen, init, rngs.params(), (cfg.max_len, cfg.dim),
                                                       param_dtype, ("length", "embed"))
        self.blocks = layers.stack_modules(
            lambda r: TextBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r,
                                attention_implementation=attention_implementation),
            cfg.num_layers, rngs)
        self.final_norm = layers.LayerNorm(cfg.dim, axis_name="embed", variable_type=layers.Frozen, rngs=rngs,
                                           param_dtype=param_dtype)
        self.projection = layers.Dense(cfg.dim, cfg.embed_dim, axes=("embed", "joint_embed"),
                                       variable_type=layers.Frozen, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

    def __call__(self, tokens: Array, valid: Array) -> Array:
        chex.assert_rank(tokens, 2)
        chex.assert_shape(valid, tokens.shape)
        if tokens.shape[1] > self.cfg.max_len:
            raise ValueError(f"texts of {tokens.shape[1]} tokens exceed the text encoder's max_len "
                             f"{self.cfg.max_len}; raise model.text.max_len or shorten the data's max_len.")
        x = jnp.take(self.token_embedding[...], tokens, axis=0).astype(self.dtype)
        x = x + self.position_embedding[...][: tokens.shape[1]].astype(self.dtype)
        graphdef, state = nnx.split(self.blocks)
        x, _ = layers.scan_stack(graphdef, state, lambda block, h, _: (block(h, valid), None), x,
                                 remat_policy=self.remat_policy)
        x = self.final_norm(x)
        weights = valid.astype(jnp.float32)[..., None]
        pooled = jnp.sum(x.astype(jnp.float32) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return self.projection(pooled.astype(self.dtype))
