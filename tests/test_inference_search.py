"""Beam search and sampling against what they promise, on fixed logits functions (no model).

`decoding.beam_search` only needs the model's `extend_cache`; a stand-in whose next-token
logits are a fixed function of the tokens generated so far lets the result be compared with
an exhaustive search over every sequence. The sampling chooser is checked by its draws.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.inference import decoding
from flamingo_jax.models.flamingo import MediaKV, StackCache

VOCAB, STEPS, STOP, PAD = 8, 3, 1, 0
LIKELY = (1, 2, 3)  # the stop token and two words; the other tokens are nearly impossible


class PrefixLogits:
    """A stand-in for Flamingo in decoding: the cache's `tail` [1, B, S] holds the tokens
    generated so far, `media_index` carries the row's id (it follows rows through beams),
    and the next-token logits are tables[row] summed over (position, token) of the prefix."""

    def __init__(self, seed: int, rows: int):
        rng = np.random.default_rng(seed)
        likely = np.isin(np.arange(VOCAB), LIKELY)
        # [rows, term, token + 1, VOCAB]: term 0 is a bias (token index 0), term i + 1 adds
        # generated token i's row (token index 0, not generated yet, adds nothing).
        weights = np.zeros((rows, STEPS + 1, VOCAB + 1, VOCAB), np.float32)
        weights[:, 0, 0] = np.where(likely, 2.0 * rng.standard_normal((rows, VOCAB)), -30.0)
        weights[:, 1:, 1:] = np.where(likely, 2.0 * rng.standard_normal((rows, STEPS, VOCAB, VOCAB)), 0.0)
        self.weights = jnp.asarray(weights)

    def logits(self, row, prefix):
        """Next-token logits after `prefix` [S] (-1: not yet generated)."""
        positions = jnp.arange(prefix.shape[0] + 1)
        tokens = jnp.concatenate([jnp.zeros((1,), jnp.int32), prefix + 1])  # slot 0: the empty prefix's bias
        return jnp.sum(self.weights[row, positions, tokens], axis=0)

    def extend_cache(self, tokens, media_index, positions, media_kv, cache, slots, position_keys):
        history = jax.lax.dynamic_update_slice_in_dim(cache.tail[0], tokens, slots.start, axis=1)
        logits = jax.vmap(self.logits)(media_index[:, 0], history[:, :STEPS])
        return logits[:, None], StackCache(None, history[None])


def start(model: PrefixLogits, rows: int) -> decoding.Context:
    history = jnp.full((rows, STEPS + 1), -1, jnp.int32)
    ids = jnp.arange(rows, dtype=jnp.int32)
    return decoding.Context(
        cache=StackCache(None, history[None]), media_kv=MediaKV(None, None), position_keys=None,
        slot_positions=jnp.zeros((rows, STEPS + 1), jnp.int32), slot_valid=jnp.zeros((rows, STEPS + 1), bool),
        length=jnp.zeros((), jnp.int32), next_position=jnp.zeros((rows,), jnp.int32), media_index=ids,
        last_logits=jax.vmap(model.logits)(ids, history[:, :STEPS]))


def brute_force(model: PrefixLogits, row: int, alpha: float) -> tuple[tuple[int, ...], float]:
    """The best of all VOCAB ** STEPS continuations, cut after their first stop, by
    score / ((5 + length) / 6) ** alpha: (tokens up to the stop, raw score)."""
    best, best_key = None, -np.inf
    seen = set()
    for sequence in itertools.product(range(VOCAB), repeat=STEPS):
        cut = sequence[:sequence.index(STOP) + 1] if STOP in sequence else sequence
        if cut in seen:
            continue
        seen.add(cut)
        weights, score = np.asarray(model.weights[row], np.float64), 0.0
        for i, token in enumerate(cut):
            logits = weights[0, 0] + sum(weights[j + 1, t + 1] for j, t in enumerate(cut[:i]))
            score += logits[token] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        key = score / ((5 + len(cut)) / 6) ** alpha
        if key > best_key:
            best, best_key = (cut, score), key
    return best


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_beam_search_equals_exhaustive_search_with_stops_and_length_penalty(alpha):
    rows = 4
    model = PrefixLogits(seed=1, rows=rows)
    # 8 beams hold every hypothesis the 3 likely tokens make (1 + 2 + 4 unfinished-or-stopped
    # prefixes after two steps), so beam search must find the exhaustive optimum.
    result = jax.jit(lambda context: decoding.beam_search(
        model, context, num_beams=VOCAB, max_new_tokens=STEPS, stop_ids=(STOP,), pad_id=PAD, alpha=alpha))(
        start(model, rows))
    expected = [brute_force(model, row, alpha) for row in range(rows)]
    for row, (tokens, score) in enumerate(expected):
        n = len(tokens)
        assert list(np.asarray(result.tokens[row, :n])) == list(tokens), (row, alpha)
        assert (np.asarray(result.tokens[row, n:]) == PAD).all()  # padded after the stop
        assert int(result.lengths[row]) == n
        np.testing.assert_allclose(float(result.scores[row]), score, rtol=1e-5)
    # The case is one where it matters: the penalty changes some row's answer, and with it
    # some row stops mid-sequence (a stop, then padding).
    raw = [brute_force(model, row, 0.0)[0] for row in range(rows)]
    penalised = [brute_force(model, row, 2.0)[0] for row in range(rows)]
    assert raw != penalised
    assert any(1 < len(t) < STEPS and t[-1] == STOP for t in penalised)


# ------------------------------------------------------------------ sampling
DRAWS = 2000


def draw(logits, **options):
    choose = decoding.sampling_chooser(**options)
    keys = jax.random.split(jax.random.key(0), DRAWS)
    return np.asarray(jax.jit(jax.vmap(lambda key: choose(logits[None], key)[0]))(keys))


def assert_frequencies(samples, probs):
    """Each token's count is within 4.5 binomial standard deviations of DRAWS * p (and
    tokens with p = 0 never appear)."""
    counts = np.bincount(samples, minlength=probs.size)
    expected = DRAWS * probs
    bound = 4.5 * np.sqrt(DRAWS * probs * (1 - probs)) + 1e-9
    assert (np.abs(counts - expected) <= bound).all(), (counts, expected.round(1))


LOGITS = jnp.asarray([2.0, 0.3, 1.5, -1.0, 0.9, 2.4, -0.2, 1.1, 0.0, -3.0])


@pytest.mark.parametrize("temperature", [0.7, 1.6])
def test_sampling_frequencies_match_the_tempered_softmax(temperature):
    samples = draw(LOGITS, temperature=temperature)
    assert_frequencies(samples, np.asarray(jax.nn.softmax(LOGITS / temperature), np.float64))


def test_top_k_draws_stay_in_the_k_most_likely_with_renormalised_frequencies():
    samples = draw(LOGITS, temperature=1.3, top_k=3)
    top = np.argsort(-np.asarray(LOGITS))[:3]
    assert set(np.unique(samples)) == set(top)
    probs = np.zeros(LOGITS.size)
    probs[top] = np.asarray(jax.nn.softmax(LOGITS[top] / 1.3))
    assert_frequencies(samples, probs)


def test_top_p_keeps_exactly_the_nucleus():
    temperature, top_p = 1.2, 0.7
    probs = np.asarray(jax.nn.softmax(LOGITS / temperature), np.float64)
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    nucleus = order[mass_before < top_p]  # the smallest most-likely set holding top_p of the mass
    assert probs[nucleus].sum() >= top_p > probs[nucleus[:-1]].sum()
    samples = draw(LOGITS, temperature=temperature, top_p=top_p)
    assert set(np.unique(samples)) == set(nucleus)
    kept = np.zeros_like(probs)
    kept[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert_frequencies(samples, kept)
