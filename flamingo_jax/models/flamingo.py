"""Flamingo: media -> visual tokens -> conditioned frozen LM -> logits.

Composition (paper Fig. 3): a frozen vision encoder turns each frame into a grid
of features; the Perceiver Resampler turns each media item into 64 visual
tokens; the frozen LM runs with a GATED XATTN-DENSE block before every
`xattn.every`-th layer, starting at layer `xattn.first_layer` (0 in the paper;
every - 1 in OpenFlamingo, whose blocks precede layer i when (i + 1) % every == 0).

Depth does not grow the program: after a lead of `first_layer` plain LM layers,
the layers are grouped as [G, k] (G = (L - lead) // k groups of k layers, each
preceded by one xattn block) and scanned; when k does not divide L - lead, one
tail group of the remaining layers follows with the last xattn block. 80 layers
with k=7 gives 11 groups of 7 plus a tail of 3: exactly 12 blocks.

New tokens (<EOC> first) get trainable input and output rows beside the frozen
vocabulary: ids >= vocab_size index the trainable table.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.decoder import HIDDEN_AXES, CacheSlots, Decoder, LayerCache, default_positions, uncached_slots
from flamingo_jax.models.partitioning import constrain, constrain_subdivided, last_mesh_axis_size, split_ways
from flamingo_jax.models.resampler import PerceiverResampler
from flamingo_jax.models.xattn import GatedCrossAttentionBlock

Array = jax.Array


class StackCache(NamedTuple):
    """The LM's KV cache in the scanned layout: `head` [G, k, B, S, K, H] for the G
    groups of k layers, `tail` [t, B, S, K, H] for the t layers after them (None when
    t = 0), `lead` [first_layer, B, S, K, H] for the plain layers before the first
    block (None when first_layer = 0)."""

    head: LayerCache
    tail: LayerCache | None
    lead: LayerCache | None = None

    def take_rows(self, rows: Array) -> StackCache:
        """The cache of batch rows `rows` [B'] (repeats allowed)."""
        take = lambda axis: (lambda a: jnp.take(a, rows, axis=axis))
        return StackCache(jax.tree.map(take(2), self.head), jax.tree.map(take(1), self.tail),
                          jax.tree.map(take(1), self.lead))


class MediaKV(NamedTuple):
    """Each xattn block's projected visual keys/values: `head` [G, B, M, R, N, H], `tail` [B, M, R, N, H]."""

    head: LayerCache
    tail: LayerCache | None

    def take_rows(self, rows: Array) -> MediaKV:
        """The keys/values of batch rows `rows` [B'] (repeats allowed)."""
        take = lambda axis: (lambda a: jnp.take(a, rows, axis=axis))
        return MediaKV(jax.tree.map(take(1), self.head), jax.tree.map(take(0), self.tail))


def encode_frames(encoder: nnx.Module, frames: Array) -> Array:
    """A frozen encoder over frames [N, H, W, C] -> [N, S, Dv], its work shared out by the
    'vision_batch' rule (e.g. 'tensor') beside 'batch': without it, each tensor rank would encode
    all of its data shard's frames. Each data shard's frames are cut among its ranks (no
    communication: every rank holds them), the features gathered after (the Resampler's tensor
    ranks all read every frame's).

    Where the split does not divide a shard's frames (the 80B's 40 M3W frames over 16 ranks), an
    encoder that is convolutional all through (`row_stride`: NFNet) may also split each frame's
    rows: the frames over a factor of the ranks that divides them, the rows over the rest (8 x 2
    for the 40), the convolutions trading a row of halo between neighbours. Frames are padded to
    a multiple of the frame split only when that is less work (`_frame_and_row_ways`)."""
    outer, inner = split_ways(("batch", "vision_batch"))
    n = frames.shape[0]
    if inner == 1 or n % outer:
        return encoder(frames)
    local = n // outer
    frame_ways, row_ways = _frame_and_row_ways(encoder, local, frames.shape[1], inner)
    padded = -(-local // frame_ways) * frame_ways
    x = frames.reshape(outer, local, *frames.shape[1:])
    x = jnp.pad(x, ((0, 0), (0, padded - local)) + ((0, 0),) * (x.ndim - 2))
    x = constrain_subdivided(x, ("batch", "vision_batch") + (None,) * (x.ndim - 2), "vision_batch", 2, row_ways)
    features = encoder(x.reshape(outer * padded, *frames.shape[1:]))
    features = features.reshape(outer, padded, *features.shape[1:])
    features = constrain(features, ("batch",) + (None,) * (features.ndim - 1))
    return features[:, :local].reshape(n, *features.shape[2:])


def _frame_and_row_ways(encoder: nnx.Module, frames: int, rows: int, ways: int) -> tuple[int, int]:
    """How `ways` ranks share `frames` frames of `rows` rows: (frame split, row split), their
    product `ways`. Each rank's work is the padded frame count / `ways`, so the split that pads
    least wins, and of equals the one that cuts fewer rows (less halo). Rows are cut only where
    the encoder allows it (`row_stride`: its output has rows / row_stride rows, which the row
    split must divide) and the mesh axis can be subdivided."""
    stride = getattr(encoder, "row_stride", None)
    best = (ways, 1)
    if stride is None:
        return best
    subdivisible = math.gcd(ways, last_mesh_axis_size("vision_batch"))
    for row_ways in range(2, subdivisible + 1):
        if subdivisible % row_ways or rows % (stride * row_ways):
            continue
        frame_ways = ways // row_ways
        if -(-frames // frame_ways) * frame_ways < -(-frames // best[0]) * best[0]:
            best = (frame_ways, row_ways)
    return best


def build_vision_encoder(cfg: FlamingoConfig, *, dtype, param_dtype, rngs: nnx.Rngs,
                         remat_policy: str = "none") -> nnx.Module:
    """The encoder named by `cfg.vision.encoder`; returns [B, S, Dv] per image. Flamingo freezes it
    (no remat: nothing to differentiate); its contrastive pretraining passes `remat_policy`."""
    vision = cfg.vision
    if vision.encoder == "nfnet":
        from flamingo_jax.models.nfnet import NFNet

        return NFNet(vision.nfnet, dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat_policy=remat_policy)
    if vision.encoder == "vit":
        from flamingo_jax.models.vit import ViT

        return ViT(vision.vit, vision.image_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                   attention_implementation=cfg.attention, remat_policy=remat_policy)
    raise ValueError(f"config field `model.vision.encoder`: unknown encoder {vision.encoder!r}; use 'nfnet' or 'vit'.")


class Flamingo(nnx.Module):
    def __init__(self, cfg: FlamingoConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dtype, frozen_dtype, trainable_dtype = cfg.dtypes()
        self.dtype = dtype
        self.vision_encoder = build_vision_encoder(cfg, dtype=dtype, param_dtype=frozen_dtype, rngs=rngs)
        self.resampler = PerceiverResampler(
            cfg.resampler, media_dim=self.vision_encoder.out_dim, num_frames=cfg.vision.num_frames,
            dtype=dtype, param_dtype=trainable_dtype, remat_policy=cfg.remat_policy,
            attention_implementation=cfg.attention, rngs=rngs)
        self.decoder = Decoder(cfg.decoder, dtype=dtype, param_dtype=frozen_dtype, remat_policy=cfg.remat_policy,
                               attention_implementation=cfg.attention, rngs=rngs)
        dim = cfg.decoder.dim
        self.xattn = layers.stack_modules(
            lambda r: GatedCrossAttentionBlock(
                dim, cfg.resampler.dim, num_heads=cfg.xattn.num_heads, head_dim=cfg.xattn.head_dim,
                ffw_hidden=cfg.xattn_ffw_hidden, activation=cfg.xattn.activation, dtype=dtype,
                param_dtype=trainable_dtype, attention_implementation=cfg.attention, gating=cfg.xattn.gating, rngs=r),
            cfg.num_xattn_blocks, rngs)
        self.new_token_embedding = layers.make_variable(
            nnx.Param, nnx.initializers.normal(dim ** -0.5), rngs.params(), (cfg.num_new_tokens, dim), trainable_dtype,
            ("new_vocab", "embed"))
        self.new_token_unembedding = None if cfg.decoder.tie_embeddings else layers.make_variable(
            nnx.Param, layers.fan_in_init(dim), rngs.params(), (dim, cfg.num_new_tokens), trainable_dtype,
            ("embed", "new_vocab"))

    # ---------------------------------------------------------------- media
    def encode_media(self, media: Array) -> Array:
        """Media [B, M, T, H, W, 3] -> visual tokens [B, M, R, D_resampler].

        The encoder is frozen and sits before every trainable weight, so no
        gradient is taken through it."""
        chex.assert_rank(media, 6)
        chex.assert_axis_dimension(media, 5, 3)
        b, m, t, h, w, c = media.shape
        features = encode_frames(self.vision_encoder, media.reshape(b * m * t, h, w, c).astype(self.dtype))
        features = jax.lax.stop_gradient(features)
        visual = self.resampler(features.reshape(b, m, t, *features.shape[1:]))
        return constrain(visual, ("batch", "media", "latents", "media_embed"))

    # ---------------------------------------------------------------- text
    def embed(self, tokens: Array) -> Array:
        """[B, T] ids, frozen vocab then new tokens -> [B, T, D]."""
        vocab = self.cfg.decoder.vocab_size
        is_new = tokens >= vocab
        frozen = self.decoder.embed(jnp.where(is_new, 0, tokens))
        new = jnp.take(self.new_token_embedding[...], jnp.clip(tokens - vocab, 0, self.cfg.num_new_tokens - 1),
                       axis=0).astype(self.dtype)
        return jnp.where(is_new[..., None], new, frozen)

    def output_embeddings(self) -> tuple[Array, Array]:
        """The unembedding in vocabulary order: the frozen LM's [D, vocab_size], then the new
        tokens' [D, num_new_tokens] (trainable), in the compute dtype."""
        if self.new_token_unembedding is None:
            new_w = self.new_token_embedding[...].astype(self.dtype).T
        else:
            new_w = self.new_token_unembedding[...].astype(self.dtype)
        return self.decoder.output_embedding(), new_w

    def logits(self, h: Array) -> Array:
        """[B, T, D] final hidden states -> [B, T, vocab_size + num_new_tokens] (fp32)."""
        new = jnp.dot(h, self.output_embeddings()[1], preferred_element_type=jnp.float32)
        return jnp.concatenate([self.decoder.logits(h), new], axis=-1)

    # ---------------------------------------------------------------- layers
    def _groups(self) -> tuple[Any, Array, Any, Array | None]:
        """The scanned groups and the tail: (head xattn states [G], LM layer indices [G, k],
        tail xattn state, tail LM layer indices [t] or None). The lead layers are `_lead_layers`.

        LM weights are indexed inside the scans, never sliced or reshaped into groups:
        XLA copies a reshaped weight fed to a scan on every call, which for a frozen
        LM is all of its weights per step."""
        lead, num_groups, k, tail = self.cfg.xattn_layout
        _, xattn_state = nnx.split(self.xattn)
        head_xattn = jax.tree.map(lambda a: a[:num_groups], xattn_state)
        head_layers = lead + jnp.arange(num_groups * k, dtype=jnp.int32).reshape(num_groups, k)
        if not tail:
            return head_xattn, head_layers, None, None
        tail_xattn = jax.tree.map(lambda a: a[num_groups], xattn_state)
        start = lead + num_groups * k
        return head_xattn, head_layers, tail_xattn, jnp.arange(start, start + tail, dtype=jnp.int32)

    def _lead_layers(self) -> Array | None:
        """Indices of the plain LM layers before the first xattn block (None: there are none)."""
        lead = self.cfg.xattn.first_layer
        return jnp.arange(lead, dtype=jnp.int32) if lead else None

    def _stack(self, x: Array, positions: Array, slots: CacheSlots, media_index: Array, *,
               visual: Array | None = None, media_kv: MediaKV | None = None, cache: StackCache | None = None,
               position_keys: Array | None = None, fresh: bool = False) -> tuple[Array, StackCache | None]:
        """The conditioned LM, the one path of training, prefill and decoding: the lead LM
        layers, then for each group its GATED XATTN-DENSE block and its LM layers.

        x [B, T, D] at `positions` [B, T]; `media_index` [B, T]. The blocks' visual keys/values
        are projected from `visual` [B, M, R, Dr] inside each block (training: rematerialised
        with it) or taken from `media_kv` (projected once per prompt). With a `cache` the new
        tokens' keys/values are written at `slots.start` and the extended cache is returned
        (`fresh`: it was empty, `DecoderLayer`)."""
        xattn_graph, _ = nnx.split(self.xattn)
        head_xattn, head_layers, tail_xattn, tail_layers = self._groups()
        lead_layers = self._lead_layers()
        num_media = visual.shape[1] if visual is not None else media_kv.head.keys.shape[2]

        def xattn_step(xattn_state, x, kv):
            block = nnx.merge(xattn_graph, xattn_state)
            if kv is None:
                kv = block.project_media(visual)
            else:  # [B, M, R, N, H] -> [B, M*R, N, H]
                kv = tuple(a.reshape(a.shape[0], -1, *a.shape[3:]) for a in kv)
            return block(x, kv, media_index, num_media)

        xattn_step = layers.remat(xattn_step, self.cfg.remat_policy)

        def group(x, inputs):
            xattn_state, layer_indices, kv, layer_cache, layer_position_keys = inputs
            x = constrain(xattn_step(xattn_state, x, kv), HIDDEN_AXES)
            return self.decoder.run_layers(x, positions, slots, layer_cache, layer_indices, layer_position_keys,
                                           fresh=fresh)

        lead = 0 if lead_layers is None else lead_layers.shape[0]
        num_groups, k = head_layers.shape
        keys = lambda start, stop: None if position_keys is None else position_keys[start:stop]
        lead_cache = None
        if lead_layers is not None:
            x, lead_cache = self.decoder.run_layers(x, positions, slots, None if cache is None else cache.lead,
                                                    lead_layers, keys(0, lead), fresh=fresh)
        split = lambda tree, head: None if tree is None else getattr(tree, "head" if head else "tail")
        head_keys = None if position_keys is None else keys(lead, lead + num_groups * k).reshape(
            num_groups, k, *position_keys.shape[1:])
        x, head_cache = jax.lax.scan(group, x, (head_xattn, head_layers, split(media_kv, True), split(cache, True),
                                                head_keys))
        tail_cache = None
        if tail_layers is not None:
            x, tail_cache = group(x, (tail_xattn, tail_layers, split(media_kv, False), split(cache, False),
                                      keys(lead + num_groups * k, None)))
        return x, (None if cache is None else StackCache(head_cache, tail_cache, lead_cache))

    # ---------------------------------------------------------------- inference
    def project_media(self, visual: Array) -> MediaKV:
        """Every xattn block's keys/values of the visual tokens [B, M, R, Dr]: computed
        once per prompt, then reused by every decoding step (and every candidate)."""
        xattn_graph, _ = nnx.split(self.xattn)
        head_xattn, _, tail_xattn, _ = self._groups()
        b, m, r, _ = visual.shape

        def project(xattn_state):
            keys, values = nnx.merge(xattn_graph, xattn_state).project_media(visual)
            return LayerCache(keys.reshape(b, m, r, *keys.shape[2:]), values.reshape(b, m, r, *values.shape[2:]))

        head = jax.vmap(project)(head_xattn)
        return MediaKV(head, project(tail_xattn) if tail_xattn is not None else None)

    def empty_cache(self, batch: int, num_slots: int, dtype=None) -> StackCache:
        """A zeroed KV cache for `num_slots` tokens, laid out like the scanned groups."""
        cfg = self.cfg.decoder
        lead, num_groups, k, tail = self.cfg.xattn_layout
        slot_shape = (batch, num_slots, cfg.num_kv_heads or cfg.num_heads, cfg.head_dim)
        zeros = lambda *layer_axes: jnp.zeros((*layer_axes, *slot_shape), dtype or self.dtype)
        layer_cache = lambda *layer_axes: LayerCache(zeros(*layer_axes), zeros(*layer_axes))
        return StackCache(layer_cache(num_groups, k), layer_cache(tail) if tail else None,
                          layer_cache(lead) if lead else None)

    def position_keys(self, num_slots: int) -> Array | None:
        """The LM's relative-position tables for `num_slots` key slots (None unless the decoder
        uses relative positions): computed once per prompt, reused by every decoding step."""
        return self.decoder.position_keys(num_slots)

    def extend_cache(self, tokens: Array, media_index: Array, positions: Array, media_kv: MediaKV,
                     cache: StackCache, slots: CacheSlots, position_keys: Array | None, *,
                     last_only: bool = False, fresh: bool = False) -> tuple[Array, StackCache]:
        """Runs new tokens [B, T] against the cache: returns their logits [B, T, V + new]
        and the cache with their keys/values written at `slots.start`. Prefill is this
        call with the whole prompt (`last_only`: the last token's logits, [B, 1, V + new];
        `fresh`: the cache is empty, so the prompt attends to itself alone); each decoding
        step, with one token."""
        chex.assert_rank(tokens, 2)
        chex.assert_shape([media_index, positions], tokens.shape)
        x, cache = self._stack(self.embed(tokens), positions, slots, media_index, media_kv=media_kv, cache=cache,
                               position_keys=position_keys, fresh=fresh)
        if last_only:
            x = x[:, -1:]
        return self.logits(self.decoder.final_norm(x)), cache

    def final_hidden(self, tokens: Array, media: Array, media_index: Array, positions: Array | None = None,
                     valid: Array | None = None) -> Array:
        """tokens [B, T], media [B, M, T_frames, H, W, 3], media_index [B, T] -> final-normed hidden
        states [B, T, D]: what the training loss takes, with `output_embeddings`."""
        chex.assert_rank(tokens, 2)
        chex.assert_shape(media_index, tokens.shape)
        chex.assert_axis_dimension(media, 0, tokens.shape[0])
        positions, valid = default_positions(tokens, positions, valid)
        x, _ = self._stack(self.embed(tokens), positions, uncached_slots(positions, valid), media_index,
                           visual=self.encode_media(media), position_keys=self.position_keys(tokens.shape[1]))
        return self.decoder.final_norm(x)

    def __call__(self, tokens: Array, media: Array, media_index: Array, positions: Array | None = None,
                 valid: Array | None = None) -> Array:
        """tokens [B, T], media [B, M, T_frames, H, W, 3], media_index [B, T] -> logits [B, T, V + new]."""
        return self.logits(self.final_hidden(tokens, media, media_index, positions, valid))
