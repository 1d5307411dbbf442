"""The frozen language model: one decoder-only Transformer with switches per family.

`DecoderConfig` picks the family's choices; the defaults are Chinchilla's (the paper):
* positions: Transformer-XL relative encodings (Chinchilla/Gopher: sinusoids of the
  query-key distance, projected per layer, with global content and position biases
  u and v), rotary embeddings (LLaMA and GPT-NeoX, the "rotate half" layout of the
  Hugging Face checkpoints, optionally on part of each head and with Llama 3's
  frequency scaling) or ALiBi (MPT: a per-head linear penalty on the distance);
* norms: RMSNorm (Chinchilla, LLaMA) or LayerNorm with or without bias (NeoX, MPT);
* feed-forward: GeLU MLP or SwiGLU; biases on projections where the family has them;
* sequential or parallel (GPT-NeoX) attention and feed-forward residuals;
* grouped-query attention (`num_kv_heads` < `num_heads`); tied or untied embeddings.

Every weight is `Frozen`. There is one forward path, with or without a KV cache:
a layer projects its new tokens' keys/values, writes them into the cache at
`slots.start` (without a cache, the keys are exactly the new tokens') and
attends over all cached slots, causally by *position*. Training is that call on
a sequence with no cache; prefill is it with an empty cache; each decoding step,
with one token. What depends only on the weights and the cache size (the
projected relative-position table) is computed once per call, outside the
layer scan (`position_keys`), and decoding keeps it for every step.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.attention import attention, attention_over_parts
from flamingo_jax.models.config import DecoderConfig, RopeScaling
from flamingo_jax.models.partitioning import constrain

Array = jax.Array
HIDDEN_AXES = ("batch", "length", "embed")  # the residual stream [B, T, D]


# ------------------------------------------------------------------ positions


def sinusoid_table(num_positions: int, dim: int, dtype: Any = jnp.float32) -> Array:
    """Transformer-XL sinusoids for distances 0..num_positions-1: [P, dim]."""
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = jnp.arange(num_positions, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1).astype(dtype)


def rotary_frequencies(rotary_dims: int, theta: float, scaling: RopeScaling) -> Array:
    """Inverse frequencies [rotary_dims / 2] of the rotary embedding, scaled as configured."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dims, 2, dtype=jnp.float32) / rotary_dims))
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        # Llama 3.1: long wavelengths slow down by `factor`, short ones stay, the band between blends.
        wavelength = 2 * math.pi / inv_freq
        low_freq_wavelength = scaling.original_max_len / scaling.low_freq_factor
        high_freq_wavelength = scaling.original_max_len / scaling.high_freq_factor
        smooth = (scaling.original_max_len / wavelength - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        scaled = jnp.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
        medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
        return jnp.where(medium, blended, scaled)
    return inv_freq


def apply_rotary(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotary embedding in the "rotate half" layout on the first 2 * len(inv_freq) dims of each head
    (the rest pass through, as GPT-NeoX's partial rotary). x: [B, T, N, H]; positions: [B, T]."""
    half = inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2, rest = x32[..., :half], x32[..., half:2 * half], x32[..., 2 * half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)


def alibi_slopes(num_heads: int, max_bias: float) -> Array:
    """ALiBi's per-head slopes [N] (Press et al. 2022, as MPT computes them): for N a power of
    two, 2^(-max_bias * i / N) for i = 1..N; otherwise the odd then even slopes of the next power."""
    padded = 1 << (num_heads - 1).bit_length()
    slopes = 2.0 ** (-max_bias * jnp.arange(1, padded + 1, dtype=jnp.float32) / padded)
    if padded != num_heads:
        slopes = jnp.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


# ------------------------------------------------------------------ cache


class LayerCache(NamedTuple):
    """One layer's (or a stack's, with leading layer axes) projected keys and values: [..., B, S, K, H]."""

    keys: Array
    values: Array


class CacheSlots(NamedTuple):
    """Where the keys stand, shared by every layer: new keys go to slots [start, start + T);
    `positions` / `valid` [B, S] describe all S slots (written ones at their token
    positions, free ones invalid). Without a cache the slots are the new tokens themselves."""

    start: Array  # int32 []
    positions: Array  # int32 [B, S]
    valid: Array  # bool [B, S]


# The decoding layout of a layer's cache (`DecoderLayer.__call__(..., decode_layout=True)`):
# keys [B, K, S, H], values [B, K, H, S], the orders XLA:CPU's attention dots of one new token
# read in place (from [B, S, K, H] it transposes, a copy of the whole cache, every step).
_TO_DECODE_LAYOUT = ((0, 2, 1, 3), (0, 2, 3, 1))  # from [B, T, K, H]
_FROM_DECODE_LAYOUT = ((0, 2, 1, 3), (0, 3, 1, 2))  # back to [B, S, K, H]
_DECODE_SLOT_AXIS = (2, 3)


def write_cache(cache: LayerCache | None, keys: Array, values: Array, start: Array, *,
                decode_layout: bool = False) -> LayerCache:
    """The cache with new keys/values [B, T, K, H] at slot `start`; no cache: just the new ones.
    `decode_layout`: the cache is laid out as `_TO_DECODE_LAYOUT` says."""
    if cache is None:
        return LayerCache(keys, values)
    if not decode_layout:
        write = lambda buffer, new: jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), start, 1)
        return LayerCache(write(cache.keys, keys), write(cache.values, values))
    return LayerCache(*(jax.lax.dynamic_update_slice_in_dim(buffer, jnp.transpose(new, order).astype(buffer.dtype),
                                                            start, axis)
                        for buffer, new, order, axis in zip(cache, (keys, values), _TO_DECODE_LAYOUT,
                                                            _DECODE_SLOT_AXIS)))


def decode_layout_view(cache: LayerCache) -> LayerCache:
    """A cache in the decoding layout seen as [B, S, K, H] (transposes XLA folds into the dots)."""
    return LayerCache(*(jnp.transpose(a, order) for a, order in zip(cache, _FROM_DECODE_LAYOUT)))


def decode_layout_shapes(batch: int, num_slots: int, num_kv_heads: int, head_dim: int) -> LayerCache:
    """The shapes of one layer's cache in the decoding layout."""
    return LayerCache((batch, num_kv_heads, num_slots, head_dim), (batch, num_kv_heads, head_dim, num_slots))


# ------------------------------------------------------------------ layers


def _norm(cfg: DecoderConfig, *, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
    kw = dict(axis_name="embed", variable_type=layers.Frozen, rngs=rngs, eps=cfg.norm_eps, param_dtype=param_dtype)
    if cfg.norm == "layer":
        return layers.LayerNorm(cfg.dim, use_bias=cfg.norm_bias, **kw)
    return layers.RMSNorm(cfg.dim, **kw)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation: str = "xla"):
        self.cfg = cfg
        self.dtype = dtype
        self.implementation = implementation
        num_kv = cfg.num_kv_heads or cfg.num_heads
        kw = dict(variable_type=layers.Frozen, rngs=rngs, param_dtype=param_dtype, dtype=dtype,
                  use_bias=cfg.attention_bias)
        self.query = layers.Dense(cfg.dim, (cfg.num_heads, cfg.head_dim), axes=("embed", "heads", "kv"), **kw)
        self.key = layers.Dense(cfg.dim, (num_kv, cfg.head_dim), axes=("embed", "kv_heads", "kv"), **kw)
        self.value = layers.Dense(cfg.dim, (num_kv, cfg.head_dim), axes=("embed", "kv_heads", "kv"), **kw)
        self.out = layers.Dense((cfg.num_heads, cfg.head_dim), cfg.dim, axes=("heads", "kv", "embed"), **kw)
        if cfg.positions == "relative":
            # W_r projects the distance sinusoids; u and v are the content and
            # position biases of Transformer-XL (Dai et al. 2019, eq. 4).
            self.relative = layers.Dense(cfg.dim, (cfg.num_heads, cfg.head_dim), axes=("embed", "heads", "kv"),
                                         variable_type=layers.Frozen, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
            zeros = nnx.initializers.zeros
            self.content_bias = layers.make_variable(
                layers.Frozen, zeros, rngs.params(), (cfg.num_heads, cfg.head_dim), param_dtype, ("heads", "kv"))
            self.position_bias = layers.make_variable(
                layers.Frozen, zeros, rngs.params(), (cfg.num_heads, cfg.head_dim), param_dtype, ("heads", "kv"))

    @property
    def _inv_freq(self) -> Array:
        cfg = self.cfg
        return rotary_frequencies(int(cfg.head_dim * cfg.rotary_fraction), cfg.rope_theta, cfg.rope_scaling)

    def position_keys(self, num_distances: int, *, heads_first: bool = False) -> Array:
        """Transformer-XL: the projected sinusoid of every distance 0..num_distances-1, [R, N, H]
        ([N, R, H] if `heads_first`, computed so, not transposed after: the order a decoding
        step's q . r dot reads in place). It depends only on the weights and the number of key
        slots, so callers compute it once."""
        table = sinusoid_table(num_distances, self.cfg.dim, self.dtype)
        if not heads_first:
            return self.relative(table)
        return jnp.einsum("rd,dnh->nrh", table, self.relative.kernel[...].astype(self.dtype))

    def project_kv(self, x: Array, positions: Array) -> tuple[Array, Array]:
        """Keys and values of `x` [B, S, D] -> ([B, S, K, H], [B, S, K, H]); rotary applied."""
        k, v = self.key(x), self.value(x)
        if self.cfg.positions == "rotary":
            k = apply_rotary(k, positions, self._inv_freq)
        return k, v

    def attend_to(self, x: Array, positions: Array, cache: LayerCache, slots: CacheSlots,
                  position_keys: Array | None, new_kv: tuple[Array, Array] | None = None) -> Array:
        """Queries from `x` [B, T, D] at `positions` [B, T] over the cached keys/values [B, S, K, H]
        at `slots.positions` [B, S] (valid where `slots.valid`). Causality is by position: a query
        sees keys at positions <= its own.

        `new_kv`: the new tokens' own keys/values [B, T, K, H], not yet written to `cache` (whose
        slots [start, start + T) are then ignored): attended beside the cache, not copied into it."""
        cfg = self.cfg
        q = self.query(x)  # [B, T, N, H]
        scale = cfg.head_dim ** -0.5
        key_positions, key_valid = slots.positions, slots.valid
        if new_kv is not None:
            steps, num_slots = x.shape[1], slots.valid.shape[1]
            index = jnp.arange(num_slots)
            pending = (index >= slots.start) & (index < slots.start + steps)
            new_valid = jax.lax.dynamic_slice_in_dim(slots.valid, slots.start, steps, axis=1)
            key_positions = jnp.concatenate([slots.positions, positions], axis=1)
            key_valid = jnp.concatenate([slots.valid & ~pending, new_valid], axis=1)
        mask = (key_positions[:, None, :] <= positions[:, :, None]) & key_valid[:, None, :]  # [B, T, S]
        distance = positions[:, :, None] - key_positions[:, None, :]  # [B, T, S]
        bias = None
        if cfg.positions == "rotary":
            q = apply_rotary(q, positions, self._inv_freq)
        elif cfg.positions == "alibi":
            slopes = alibi_slopes(cfg.num_heads, cfg.alibi_max_bias)
            bias = -slopes[None, :, None, None] * jnp.maximum(distance, 0)[:, None].astype(jnp.float32)
        else:
            if position_keys is None:
                position_keys = self.position_keys(cache.keys.shape[1])
            num_distances = position_keys.shape[0]
            q_pos_term = q + self.position_bias[...].astype(self.dtype)
            q = q + self.content_bias[...].astype(self.dtype)
            all_distances = jnp.einsum("btnh,rnh->bntr", q_pos_term, position_keys.astype(q.dtype))  # [B, N, T, R]
            distance = jnp.clip(distance, 0, num_distances - 1)
            bias = jnp.take_along_axis(all_distances, distance[:, None], axis=-1) * scale
        if new_kv is None:
            out = attention(q, cache.keys, cache.values, bias=bias, mask=mask[:, None], scale=scale,
                            implementation=self.implementation)
        else:
            out = attention_over_parts(q, (cache.keys, new_kv[0]), (cache.values, new_kv[1]), bias=bias,
                                       mask=mask[:, None], scale=scale)
        return self.out(out)


class DecoderLayer(nnx.Module):
    """Pre-norm Transformer layer: x + attn(norm(x)), then + ffw(norm(x)); or, with
    `parallel_residual`, x + attn(norm(x)) + ffw(norm'(x))."""

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs, implementation: str = "xla"):
        self.parallel_residual = cfg.parallel_residual
        self.attention_norm = _norm(cfg, param_dtype=param_dtype, rngs=rngs)
        self.attention = SelfAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                       implementation=implementation)
        self.ffw_norm = _norm(cfg, param_dtype=param_dtype, rngs=rngs)
        gated = cfg.ffw == "swiglu"
        self.ffw = layers.FeedForward(
            cfg.dim, cfg.ffw_hidden or 4 * cfg.dim, activation="silu" if gated else cfg.ffw, gated=gated,
            variable_type=layers.Frozen, rngs=rngs, param_dtype=param_dtype, dtype=dtype, use_bias=cfg.ffw_bias)

    def __call__(self, x: Array, positions: Array, slots: CacheSlots, cache: LayerCache | None = None,
                 position_keys: Array | None = None, *, decode_layout: bool = False,
                 fresh: bool = False) -> tuple[Array, LayerCache]:
        """New tokens x [B, T, D] at `positions` [B, T]: their keys/values are written into `cache`
        at `slots.start` first (no cache: they are the keys), so the new tokens see each other
        (causally, by position) and everything cached before them. Returns (x, cache).

        `decode_layout`: the cache is in the decoding layout (`write_cache`), the tokens attend to
        the cache as it was plus their own keys, and the write comes last. XLA then updates the
        cache in place and reads it where it lies; writing first makes it fuse the write into
        every reader, each building its own copy of the cache.

        `fresh`: the cache holds nothing yet (a prefill), so the tokens attend to their own
        keys alone, not to every slot of the cache, most of them empty."""
        h = self.attention_norm(x)
        keys, values = self.attention.project_kv(h, positions)
        if fresh:
            own = CacheSlots(jnp.zeros((), jnp.int32), positions,
                             jax.lax.dynamic_slice_in_dim(slots.valid, slots.start, x.shape[1], axis=1))
            attended = self.attention.attend_to(h, positions, LayerCache(keys, values), own, position_keys)
            cache = write_cache(cache, keys, values, slots.start, decode_layout=decode_layout)
        elif decode_layout:
            attended = self.attention.attend_to(h, positions, decode_layout_view(cache), slots, position_keys,
                                                new_kv=(keys, values))
            cache = write_cache(cache, keys, values, slots.start, decode_layout=True)
        else:
            cache = write_cache(cache, keys, values, slots.start)
            attended = self.attention.attend_to(h, positions, cache, slots, position_keys)
        if self.parallel_residual:
            return x + attended + self.ffw(self.ffw_norm(x)), cache
        x = x + attended
        return x + self.ffw(self.ffw_norm(x)), cache


class Decoder(nnx.Module):
    """The frozen LM. `__call__` is the bare LM; Flamingo reuses `embed`, `run_layers`
    (layers stacked on a leading 'layers' axis) and `logits` around its own blocks."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat_policy: str = "none", attention_implementation: str = "xla", rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.remat_policy = remat_policy
        self.embedding = layers.make_variable(
            # std 1/sqrt(dim): with tied embeddings the initial logits then have unit scale.
            layers.Frozen, nnx.initializers.normal(cfg.dim ** -0.5), rngs.params(), (cfg.vocab_size, cfg.dim),
            param_dtype, ("vocab", "embed"))
        self.layers = layers.stack_modules(
            lambda r: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r,
                                   implementation=attention_implementation),
            cfg.num_layers, rngs)
        self.final_norm = _norm(cfg, param_dtype=param_dtype, rngs=rngs)
        self.unembedding = None if cfg.tie_embeddings else layers.make_variable(
            layers.Frozen, layers.fan_in_init(cfg.dim), rngs.params(), (cfg.dim, cfg.vocab_size),
            param_dtype, ("embed", "vocab"))

    def embed(self, tokens: Array) -> Array:
        """[B, T] ids in [0, vocab_size) -> [B, T, D]."""
        return constrain(jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype), HIDDEN_AXES)

    def output_embedding(self) -> Array:
        """The unembedding [D, vocab_size] in the compute dtype (the embedding's transpose when tied)."""
        if self.unembedding is None:
            return self.embedding[...].astype(self.dtype).T
        return self.unembedding[...].astype(self.dtype)

    def logits(self, h: Array) -> Array:
        """Final-normed hidden states [B, T, D] -> [B, T, vocab_size] (fp32)."""
        return constrain(jnp.dot(h, self.output_embedding(), preferred_element_type=jnp.float32),
                         ("batch", "length", "vocab"))

    def position_keys(self, num_slots: int) -> Array | None:
        """Every layer's projected relative-position table [L, S, N, H] for `num_slots` key
        slots (None unless positions are 'relative'): computed once, not per layer call."""
        if self.cfg.positions != "relative":
            return None
        graphdef, state = nnx.split(self.layers)
        relative = lambda layer_state: nnx.merge(graphdef, layer_state).attention.position_keys(num_slots)
        return jax.vmap(relative)(state)

    def run_layers(self, x: Array, positions: Array, slots: CacheSlots, cache: LayerCache | None = None,
                   layer_indices: Array | None = None, position_keys: Array | None = None, *, fresh: bool = False
                   ) -> tuple[Array, LayerCache | None]:
        """Applies the stacked layers (or those at `layer_indices`, in order) to x [B, T, D].
        With a cache (leading layer axis, one entry per layer run) returns it extended;
        without, returns None. `position_keys`: the layers' tables [L', S, N, H], one per layer run.
        `fresh`: the cache is empty (`DecoderLayer`)."""
        graphdef, state = nnx.split(self.layers)
        keep_cache = cache is not None

        def body(layer, x, per_layer):
            layer_cache, layer_position_keys = per_layer
            x, layer_cache = layer(x, positions, slots, layer_cache, layer_position_keys, fresh=fresh)
            return constrain(x, HIDDEN_AXES), (layer_cache if keep_cache else None)

        return layers.scan_stack(graphdef, state, body, x, (cache, position_keys), remat_policy=self.remat_policy,
                                 layer_indices=layer_indices)

    def final_hidden(self, tokens: Array, positions: Array | None = None, valid: Array | None = None) -> Array:
        """Bare LM: tokens [B, T] -> final-normed hidden states [B, T, D] (the loss takes these
        with `output_embedding`, never building the logits whole)."""
        chex.assert_rank(tokens, 2)
        positions, valid = default_positions(tokens, positions, valid)
        slots = uncached_slots(positions, valid)
        x, _ = self.run_layers(self.embed(tokens), positions, slots,
                               position_keys=self.position_keys(tokens.shape[1]))
        return self.final_norm(x)

    def __call__(self, tokens: Array, positions: Array | None = None, valid: Array | None = None) -> Array:
        """Bare LM: tokens [B, T] -> logits [B, T, vocab_size]."""
        return self.logits(self.final_hidden(tokens, positions, valid))


def default_positions(tokens: Array, positions: Array | None, valid: Array | None) -> tuple[Array, Array]:
    """Positions 0..T-1 and all-valid keys unless given."""
    batch, length = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if valid is None:
        valid = jnp.ones((batch, length), bool)
    return positions, valid


def uncached_slots(positions: Array, valid: Array) -> CacheSlots:
    """The key slots of a call without a cache: the new tokens themselves."""
    return CacheSlots(jnp.zeros((), jnp.int32), positions, valid)
