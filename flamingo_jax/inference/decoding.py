"""Cached decoding: prefill once, then extend a preallocated KV cache token by token.

Everything here is a pure function of a `Flamingo` module (or of the same
weights split per layer, `models/unrolled.py`'s `UnrolledFlamingo`, whose steps
are faster) and arrays, with static shapes, meant to run under one `jax.jit` each:

* `prefill` encodes the prompt's media, projects every xattn block's visual
  keys/values once, and runs the prompt through the LM into a cache of
  `num_slots` = prompt length + new tokens;
* `decode` is a `lax.while_loop` of one-token steps (greedy or sampled): one
  compiled program for any number of steps, stopping early when every row has
  emitted a stop token;
* `beam_search` keeps `num_beams` hypotheses per row, reordering the cache rows
  by parent beam each step; finished hypotheses stay in the beam with their
  score frozen, and the final choice applies the GNMT length penalty;
* `score_continuations` ranks candidate continuations: the prompt's cache is
  shared by all candidates, each candidate is one extension of it.

Prompts of different lengths share a batch by left padding: every row's last
prompt token sits in the last column, so new tokens go to the same cache slot
in every row. Attention is causal by *position* and masks invalid slots, so
padding never leaks into real tokens (see `decoder.SelfAttention.attend_to`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp

from flamingo_jax.models.decoder import CacheSlots
from flamingo_jax.models.flamingo import Flamingo, MediaKV, StackCache
from flamingo_jax.models.unrolled import LayerwiseCache, LayerwiseMediaKV, UnrolledFlamingo

Array = jax.Array
# The scanned model, or the same weights split per layer (`models/unrolled.py`: faster steps).
DecodingModel = Flamingo | UnrolledFlamingo


@flax.struct.dataclass
class Context:
    """A prefilled batch: what decoding needs besides the weights. Rows are prompts."""

    cache: StackCache | LayerwiseCache  # LM keys/values, [..., B, S, K, H]
    media_kv: MediaKV | LayerwiseMediaKV  # xattn keys/values of each prompt's media
    position_keys: Array | None  # [L, S, N, H]: the LM's relative-position tables (None: other positions)
    slot_positions: Array  # int32 [B, S]: token position held by each cache slot
    slot_valid: Array  # bool [B, S]: slot holds a real token
    length: Array  # int32 []: slots filled so far (the same for every row)
    next_position: Array  # int32 [B]: position of the next token
    media_index: Array  # int32 [B]: media item that new tokens cross-attend to (-1: none)
    last_logits: Array  # float32 [B, V]: next-token logits

    def take_rows(self, rows: Array) -> "Context":
        """The context of rows `rows` [B'] (repeats allowed): beams, candidates."""
        return self.replace(
            cache=self.cache.take_rows(rows), media_kv=self.media_kv.take_rows(rows), slot_positions=self.slot_positions[rows], slot_valid=self.slot_valid[rows],
            next_position=self.next_position[rows], media_index=self.media_index[rows],
            last_logits=self.last_logits[rows])


def prefill(model: DecodingModel, tokens: Array, media: Array, media_index: Array, positions: Array, valid: Array,
            num_slots: int) -> Context:
    """Runs left-padded prompts tokens [B, P] (with `media` [B, M, T, H, W, 3], `media_index`,
    `positions`, `valid` [B, P]) into a fresh cache of `num_slots` >= P slots."""
    return prefill_visual(model, tokens, model.encode_media(media), media_index, positions, valid, num_slots)


def prefill_visual(model: DecodingModel, tokens: Array, visual: Array, media_index: Array, positions: Array,
                   valid: Array, num_slots: int) -> Context:
    """`prefill` from the media's visual tokens [B, M, R, Dr] (`encode_media`'s output): what a
    caller that encodes each media item once, however many prompts show it, runs."""
    tokens, media_index, positions, valid = map(jnp.asarray, (tokens, media_index, positions, valid))
    batch, prompt_len = tokens.shape
    if num_slots < prompt_len:
        raise ValueError(f"a cache of {num_slots} slots cannot hold a prompt of {prompt_len} tokens.")
    media_kv = model.project_media(jnp.asarray(visual))
    position_keys = model.position_keys(num_slots)
    slot_positions = jnp.zeros((batch, num_slots), jnp.int32).at[:, :prompt_len].set(positions)
    slot_valid = jnp.zeros((batch, num_slots), bool).at[:, :prompt_len].set(valid)
    slots = CacheSlots(jnp.zeros((), jnp.int32), slot_positions, slot_valid)
    logits, cache = model.extend_cache(tokens, media_index, positions, media_kv,
                                       model.empty_cache(batch, num_slots), slots, position_keys, last_only=True,
                                       fresh=True)
    return Context(cache=cache, media_kv=media_kv, position_keys=position_keys, slot_positions=slot_positions, slot_valid=slot_valid,
                   length=jnp.asarray(prompt_len, jnp.int32), next_position=positions[:, -1] + 1,
                   media_index=media_index[:, -1], last_logits=logits[:, -1])


def extend(model: DecodingModel, context: Context, tokens: Array, valid: Array | None = None) -> tuple[Array, Context]:
    """Appends tokens [B, T] (right-padded where `valid` is False) to every row:
    returns their logits [B, T, V] and the extended context."""
    steps = tokens.shape[1]
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    positions = context.next_position[:, None] + jnp.arange(steps, dtype=jnp.int32)
    slot_positions = jax.lax.dynamic_update_slice_in_dim(context.slot_positions, positions, context.length, axis=1)
    slot_valid = jax.lax.dynamic_update_slice_in_dim(context.slot_valid, valid, context.length, axis=1)
    media_index = jnp.broadcast_to(context.media_index[:, None], tokens.shape)
    logits, cache = model.extend_cache(tokens, media_index, positions, context.media_kv, context.cache,
                                       CacheSlots(context.length, slot_positions, slot_valid), context.position_keys)
    return logits, context.replace(cache=cache, slot_positions=slot_positions, slot_valid=slot_valid,
                                   length=context.length + steps, next_position=context.next_position + steps,
                                   last_logits=logits[:, -1])


# ------------------------------------------------------------------ token choice
TokenChooser = Callable[[Array, Array], Array]  # (logits [B, V], key) -> tokens [B]


def greedy_chooser() -> TokenChooser:
    return lambda logits, key: jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sampling_chooser(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> TokenChooser:
    """Samples from softmax(logits / temperature), restricted to the `top_k` most
    likely tokens (0: all) and to the smallest set holding `top_p` of the mass."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy decoding for temperature 0.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p}).")

    def choose(logits: Array, key: Array) -> Array:
        logits = logits.astype(jnp.float32) / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if top_p < 1:
            sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
            mass_before = jnp.cumsum(jax.nn.softmax(sorted_logits), axis=-1) - jax.nn.softmax(sorted_logits)
            # The least likely logit still kept: tokens whose preceding mass is below top_p.
            cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        return jax.random.categorical(key, logits).astype(jnp.int32)

    return choose


class Decoded(NamedTuple):
    tokens: Array  # int32 [B, N]: new tokens, stop token included, pad_id after it
    lengths: Array  # int32 [B]: tokens up to and including the stop token
    scores: Array  # float32 [B]: sum of the model's log-probabilities of those tokens


def decode(model: DecodingModel, context: Context, key: Array, *, max_new_tokens: int,
           stop_ids: tuple[int, ...] | Array, pad_id: int, choose: TokenChooser) -> Decoded:
    """Up to `max_new_tokens` tokens per row; a row stops after its first stop token. `stop_ids`
    may be an argument of the compiled program: one program then serves any stop set of its size."""
    batch = context.last_logits.shape[0]
    stop_ids = jnp.asarray(stop_ids, jnp.int32)

    def not_finished(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_fn(carry):
        step, context, out, scores, done, key = carry
        key, subkey = jax.random.split(key)
        log_probs = jax.nn.log_softmax(context.last_logits)
        token = jnp.where(done, pad_id, choose(context.last_logits, subkey))
        scores = scores + jnp.where(done, 0.0, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0])
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, stop_ids)
        _, context = extend(model, context, token[:, None])
        return step + 1, context, out, scores, done, key

    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    init = (jnp.zeros((), jnp.int32), context, out, jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), bool), key)
    _, _, out, scores, _, _ = jax.lax.while_loop(not_finished, step_fn, init)
    return Decoded(out, _lengths(out, stop_ids, max_new_tokens), scores)


def _lengths(tokens: Array, stop_ids: Array, max_new_tokens: int) -> Array:
    """Tokens up to and including the first stop token (all of them if none)."""
    is_stop = jnp.isin(tokens, stop_ids)
    first = jnp.argmax(is_stop, axis=-1)
    return jnp.where(jnp.any(is_stop, axis=-1), first + 1, max_new_tokens).astype(jnp.int32)


def length_penalty(lengths: Array, alpha: float) -> Array:
    """GNMT's ((5 + length) / 6) ** alpha; alpha 0 ranks by raw log-probability."""
    return ((5.0 + lengths) / 6.0) ** alpha


def beam_search(model: DecodingModel, context: Context, *, num_beams: int, max_new_tokens: int,
                stop_ids: tuple[int, ...] | Array, pad_id: int, alpha: float = 0.0) -> Decoded:
    """The best of `num_beams` hypotheses per row, by score / length_penalty(length, alpha)."""
    batch, vocab = context.last_logits.shape
    if num_beams > vocab:
        raise ValueError(f"num_beams={num_beams} exceeds the vocabulary ({vocab}).")
    beams = num_beams
    stop_ids = jnp.asarray(stop_ids, jnp.int32)
    context = context.take_rows(jnp.repeat(jnp.arange(batch), beams))
    # A finished hypothesis has exactly one continuation, pad, at no cost: it stays
    # in the beam with its score until better ones push it out.
    finished_row = jnp.full((vocab,), -jnp.inf).at[pad_id].set(0.0)
    first_of_row = jnp.arange(batch)[:, None] * beams

    def not_finished(carry):
        step, _, _, _, finished = carry
        return (step < max_new_tokens) & ~jnp.all(finished)

    def step_fn(carry):
        step, context, sequences, scores, finished = carry
        log_probs = jax.nn.log_softmax(context.last_logits).reshape(batch, beams, vocab)
        log_probs = jnp.where(finished[..., None], finished_row, log_probs)
        top_scores, flat = jax.lax.top_k((scores[..., None] + log_probs).reshape(batch, beams * vocab), beams)
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        sequences = jnp.take_along_axis(sequences, parent[..., None], axis=1).at[:, :, step].set(token)
        finished = jnp.take_along_axis(finished, parent, axis=1) | jnp.isin(token, stop_ids)
        context = context.replace(cache=context.cache.take_rows((first_of_row + parent).reshape(-1)))
        _, context = extend(model, context, token.reshape(-1, 1))
        return step + 1, context, sequences, top_scores, finished

    sequences = jnp.full((batch, beams, max_new_tokens), pad_id, jnp.int32)
    scores = jnp.full((batch, beams), -jnp.inf).at[:, 0].set(0.0)  # expand from one hypothesis
    init = (jnp.zeros((), jnp.int32), context, sequences, scores, jnp.zeros((batch, beams), bool))
    _, _, sequences, scores, _ = jax.lax.while_loop(not_finished, step_fn, init)
    lengths = _lengths(sequences, stop_ids, max_new_tokens)
    best = jnp.argmax(scores / length_penalty(lengths, alpha), axis=1)
    pick = lambda a: jnp.take_along_axis(a, best.reshape((batch,) + (1,) * (a.ndim - 1)), axis=1)[:, 0]
    return Decoded(pick(sequences), pick(lengths), pick(scores))


def score_continuations(model: DecodingModel, context: Context, tokens: Array, valid: Array) -> Array:
    """Log-likelihood of candidate continuations tokens [B, C, T] (right-padded, `valid`)
    given each row's prompt: [B, C]. The prompt's cache is shared, not recomputed."""
    batch, num_candidates, length = tokens.shape
    context = context.take_rows(jnp.repeat(jnp.arange(batch), num_candidates))
    flat_tokens = tokens.reshape(batch * num_candidates, length)
    logits, _ = extend(model, context, flat_tokens, valid.reshape(flat_tokens.shape))
    # Token i is predicted by the logits before it: the prompt's last for i = 0.
    predicting = jnp.concatenate([context.last_logits[:, None], logits[:, :-1]], axis=1)
    log_probs = jnp.take_along_axis(jax.nn.log_softmax(predicting), flat_tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid.reshape(flat_tokens.shape), log_probs, 0.0), axis=-1).reshape(
        batch, num_candidates)
