"""GATED XATTN-DENSE: how the frozen LM is conditioned on visual tokens.

    y = y + tanh(a_xattn) * xattn(q=LN(y), kv=visual)
    y = y + tanh(a_dense) * ffw(LN(y))

`a_xattn`, `a_dense` are per-block scalars initialised to 0, so at initialisation
the block is the identity and Flamingo's output equals the frozen LM's exactly.

Which media item a text token sees is data, not model logic: the batch carries
`media_index` [B, T] (the media slot each token cross-attends to, -1 for none);
`media_attention_mask` turns it into the key mask. Keys/values of the visual
tokens are projected by `project_media` once, so inference can cache them per
prompt.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.attention import attention

Array = jax.Array


def media_attention_mask(media_index: Array, num_media: int, tokens_per_media: int) -> Array:
    """[B, T] media index -> bool [B, T, M * tokens_per_media]: token t may see key s
    iff key s belongs to media item media_index[t]. Rows with index -1 are all False."""
    key_media = jnp.repeat(jnp.arange(num_media, dtype=media_index.dtype), tokens_per_media)
    return media_index[:, :, None] == key_media[None, None, :]


class GatedCrossAttentionBlock(nnx.Module):
    """One GATED XATTN-DENSE block (trainable). Text width `dim`, visual width `media_dim`."""

    def __init__(self, dim: int, media_dim: int, *, num_heads: int, head_dim: int, ffw_hidden: int,
                 activation: str, dtype, param_dtype, rngs: nnx.Rngs, attention_implementation: str = "xla",
                 gating: str = "tanh"):
        kw = dict(variable_type=nnx.Param, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.dtype = dtype
        self.gating = gating  # 'none' (ablation): the residuals are added ungated, the gates unused
        self.attention_implementation = attention_implementation
        self.attention_norm = layers.LayerNorm(dim, axis_name="embed", variable_type=nnx.Param, rngs=rngs,
                                               param_dtype=param_dtype)
        self.query = layers.Dense(dim, (num_heads, head_dim), axes=("embed", "heads", "kv"), **kw)
        self.key = layers.Dense(media_dim, (num_heads, head_dim), axes=("media_embed", "heads", "kv"), **kw)
        self.value = layers.Dense(media_dim, (num_heads, head_dim), axes=("media_embed", "heads", "kv"), **kw)
        self.out = layers.Dense((num_heads, head_dim), dim, axes=("heads", "kv", "embed"), **kw)
        self.ffw_norm = layers.LayerNorm(dim, axis_name="embed", variable_type=nnx.Param, rngs=rngs,
                                         param_dtype=param_dtype)
        self.ffw = layers.FeedForward(dim, ffw_hidden, activation=activation, **kw)
        self.attention_gate = nnx.Param(jnp.zeros((), param_dtype), logical_axes=())
        self.ffw_gate = nnx.Param(jnp.zeros((), param_dtype), logical_axes=())

    def project_media(self, visual: Array) -> tuple[Array, Array]:
        """Visual tokens [B, M, R, Dv] -> keys, values [B, M*R, N, H]."""
        flat = visual.reshape(visual.shape[0], -1, visual.shape[-1])
        return self.key(flat), self.value(flat)

    def __call__(self, y: Array, media_kv: tuple[Array, Array], media_index: Array, num_media: int) -> Array:
        """y [B, T, D]; media_kv from `project_media`; media_index [B, T] -> [B, T, D]."""
        chex.assert_rank(y, 3)
        chex.assert_shape(media_index, y.shape[:2])
        keys, values = media_kv
        tokens_per_media = keys.shape[1] // num_media
        mask = media_attention_mask(media_index, num_media, tokens_per_media)  # [B, T, M*R]
        q = self.query(self.attention_norm(y))
        attended = attention(q, keys, values, mask=mask[:, None], implementation=self.attention_implementation)
        # A token that sees no media (index -1) gets no visual contribution at all.
        attended = jnp.where((media_index >= 0)[:, :, None, None], attended, 0)
        y = y + self._gate(self.attention_gate, y.dtype) * self.out(attended)
        return y + self._gate(self.ffw_gate, y.dtype) * self.ffw(self.ffw_norm(y))

    def _gate(self, gate: nnx.Param, dtype) -> Array:
        if self.gating == "none":
            return jnp.ones((), dtype)
        return jnp.tanh(gate[...]).astype(dtype)
