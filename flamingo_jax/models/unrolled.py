"""Flamingo for cached decoding: the layer loop unrolled over per-layer weights and caches.

The scanned path (`Flamingo._stack`) keeps training programs small whatever the depth,
but decoding one token at a time on XLA:CPU pays for it twice per step: each layer's
weights are dynamic-sliced out of the stacks (XLA materialises the slice before the
matmul), and a cache fed through the scan comes back as a freshly stacked buffer (the
whole cache copied per token). Here every LM layer and xattn block has its own arrays,
split once (`split_for_decoding`) outside the compiled programs, and its own cache
buffer, which a decoding loop carries and updates in place at the new token's slot.
The arithmetic is the scanned path's, layer for layer (tests check logits equal).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models.decoder import CacheSlots, LayerCache, decode_layout_shapes
from flamingo_jax.models.flamingo import Flamingo

Array = jax.Array

# The stacked weights that `split_for_decoding` moves into `LayerStates`.
_STACKED = (("decoder", "layers"), ("xattn",))


class LayerStates(NamedTuple):
    """Per-layer weights: `lm` one decoder-layer state per LM layer, `xattn` one block state per
    GATED XATTN-DENSE block, each sliced from the stacks once."""

    lm: tuple[Any, ...]
    xattn: tuple[Any, ...]


class LayerwiseCache(NamedTuple):
    """The LM's KV cache, one buffer per layer in the decoding layout (`decoder.write_cache`):
    keys [B, K, S, H], values [B, K, H, S]."""

    layers: tuple[LayerCache, ...]

    def take_rows(self, rows: Array) -> LayerwiseCache:
        return LayerwiseCache(jax.tree.map(lambda a: jnp.take(a, rows, axis=0), self.layers))


class LayerwiseMediaKV(NamedTuple):
    """Each xattn block's projected visual keys/values: `blocks[j]` [B, N, H, M, R] (keys last, as the cache)."""

    blocks: tuple[LayerCache, ...]

    def take_rows(self, rows: Array) -> LayerwiseMediaKV:
        return LayerwiseMediaKV(jax.tree.map(lambda a: jnp.take(a, rows, axis=0), self.blocks))


def _is_stacked(path) -> bool:
    names = tuple(getattr(key, "key", None) for key in path)
    return any(names[:len(prefix)] == prefix for prefix in _STACKED)


@jax.jit
def _unstack(stacked: jax.Array) -> tuple[jax.Array, ...]:
    """Each layer's slice of a stacked weight as its own array, from one program per shape:
    indexing eagerly ran two dispatches (slice, copy) per layer and left more garbage in the heap
    (bench/generate.py, REF-CPU: peak RSS after the split 1088-1106 MiB that way, 1039 this way)."""
    return tuple(stacked[i] for i in range(stacked.shape[0]))


def split_for_decoding(model: Flamingo, *, consume: bool = False) -> tuple[nnx.GraphDef, Any, LayerStates]:
    """(graphdef, state, layers): the model's state with its stacked LM layers and xattn blocks
    replaced by empty placeholders, and those weights as per-layer arrays. Call it once, outside
    jit (slicing inside a program would copy every weight per call); `UnrolledFlamingo.merge`
    puts the three together inside. The stacks are not kept, so the weights are held once;
    `consume` frees each stacked array as soon as it is sliced (the model is unusable after),
    so that they are never held twice either."""
    cfg = model.cfg

    def per_layer(module, num):
        _, state = nnx.split(module)
        leaves, treedef = jax.tree.flatten(state)
        sliced = []
        for leaf in leaves:
            sliced.append(_unstack(leaf))
            if consume:
                leaf.delete()
        return tuple(jax.tree.unflatten(treedef, [column[i] for column in sliced]) for i in range(num))

    layer_states = LayerStates(per_layer(model.decoder.layers, cfg.decoder.num_layers),
                               per_layer(model.xattn, cfg.num_xattn_blocks))
    graphdef, state = nnx.split(model)
    state = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros((0,), a.dtype) if _is_stacked(path) else a, state)
    return graphdef, state, layer_states


def merge_stacked(graphdef: nnx.GraphDef, state: Any, layers: LayerStates) -> Flamingo:
    """The whole `Flamingo` again, its layers re-stacked (a copy of their weights): for the
    forward pass and for tests, not for decoding."""
    state = jax.tree.map(lambda a: a, state)  # a copy of the tree, not of the arrays
    stack = lambda states: jax.tree.map(lambda *a: jnp.stack(a), *states)
    state["decoder"]["layers"] = stack(layers.lm)
    state["xattn"] = stack(layers.xattn)
    return nnx.merge(graphdef, state)


# What XLA compiles decoding programs with: copy insertion by region analysis, which sees that a
# step reads each layer's cache before writing the new slot and so writes it in place (without
# it, XLA:CPU copies every cache buffer twice per step inside the decoding loop).
COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


class UnrolledFlamingo:
    """The decoding interface of `Flamingo` (`encode_media`, `project_media`, `position_keys`,
    `empty_cache`, `extend_cache`) with the layer loop unrolled over `LayerStates`."""

    def __init__(self, model: Flamingo, layers: LayerStates):
        self.model = model
        self.cfg = model.cfg
        self.layers = layers
        self._lm_graph = nnx.graphdef(model.decoder.layers)
        self._xattn_graph = nnx.graphdef(model.xattn)
        self._block_before = {layer: j for j, layer in enumerate(self.cfg.xattn_layers)}

    @classmethod
    def merge(cls, graphdef: nnx.GraphDef, state: Any, layers: LayerStates) -> UnrolledFlamingo:
        """The inverse of `split_for_decoding` (inside a compiled program)."""
        return cls(nnx.merge(graphdef, state), layers)

    def _lm_layer(self, i: int):
        return nnx.merge(self._lm_graph, self.layers.lm[i])

    def _block(self, j: int):
        return nnx.merge(self._xattn_graph, self.layers.xattn[j])

    def encode_media(self, media: Array) -> Array:
        return self.model.encode_media(media)

    def project_media(self, visual: Array) -> LayerwiseMediaKV:
        """Every block's keys/values of the visual tokens [B, M, R, Dr], once per prompt."""
        b, m, r, _ = visual.shape

        def project(j):
            keys_last = lambda a: jnp.transpose(a, (0, 2, 3, 1)).reshape(b, *a.shape[2:], m, r)
            return LayerCache(*map(keys_last, self._block(j).project_media(visual)))

        return LayerwiseMediaKV(tuple(project(j) for j in range(self.cfg.num_xattn_blocks)))

    def position_keys(self, num_slots: int) -> tuple[Array, ...] | None:
        """Each layer's relative-position table, heads first: [N, S, H] (None unless positions are
        'relative'); the order the step's q . r dot reads in place ([S, N, H] it transposes)."""
        if self.cfg.decoder.positions != "relative":
            return None
        table = lambda i: self._lm_layer(i).attention.position_keys(num_slots, heads_first=True)
        return tuple(table(i) for i in range(self.cfg.decoder.num_layers))

    def empty_cache(self, batch: int, num_slots: int, dtype=None) -> LayerwiseCache:
        cfg = self.cfg.decoder
        shapes = decode_layout_shapes(batch, num_slots, cfg.num_kv_heads or cfg.num_heads, cfg.head_dim)
        zeros = lambda: LayerCache(*(jnp.zeros(shape, dtype or self.model.dtype) for shape in shapes))
        return LayerwiseCache(tuple(zeros() for _ in range(cfg.num_layers)))

    def extend_cache(self, tokens: Array, media_index: Array, positions: Array, media_kv: LayerwiseMediaKV,
                     cache: LayerwiseCache, slots: CacheSlots, position_keys: tuple[Array, ...] | None, *,
                     last_only: bool = False, fresh: bool = False) -> tuple[Array, LayerwiseCache]:
        """As `Flamingo.extend_cache`: logits of tokens [B, T] and the cache with their keys/values
        at `slots.start`. `last_only`: logits of the last token only, [B, 1, V + new] (prefill);
        `fresh`: the cache is empty (prefill)."""
        x = self.model.embed(tokens)
        new_cache = []
        for i, layer_cache in enumerate(cache.layers):
            j = self._block_before.get(i)
            if j is not None:
                kv = media_kv.blocks[j]  # [B, N, H, M, R] -> [B, M*R, N, H], a view
                num_media = kv.keys.shape[3]
                flat = tuple(jnp.transpose(a.reshape(*a.shape[:3], -1), (0, 3, 1, 2)) for a in kv)
                x = self._block(j)(x, flat, media_index, num_media)
            keys = None if position_keys is None else jnp.swapaxes(position_keys[i], 0, 1)  # a view
            x, layer_cache = self._lm_layer(i)(x, positions, slots, layer_cache, keys, decode_layout=True,
                                               fresh=fresh)
            new_cache.append(layer_cache)
        if last_only:
            x = x[:, -1:]
        return self.model.logits(self.model.decoder.final_norm(x)), LayerwiseCache(tuple(new_cache))
