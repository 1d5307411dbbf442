"""Cached decoding against uncached forward passes (tiny model, fp32, gates open; every program
compiled unoptimised, `helpers.FAST_COMPILE`)."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flamingo_jax.inference import decoding
from flamingo_jax.models import unrolled
from flamingo_jax.models.flamingo import Flamingo

from helpers import FAST_COMPILE, random_media, set_gates, tiny_model_config

P, NEW = 10, 6  # prompt slots, new tokens
LENGTHS = (10, 7)  # row 1 is left-padded by 3
MEDIA_INDEX = np.array([[-1, 0, 0, 0, 0, 1, 1, 1, 1, 1],
                        [-1, -1, -1, -1, 0, 0, 0, 1, 1, 1]], np.int32)


def fast_config():
    """The tiny model with a 1-block ViT (fast to compile) and 3 LM layers: one
    scanned group of 2 plus a tail layer, so both cache layouts are exercised."""
    cfg = tiny_model_config(num_layers=3)
    vit = dataclasses.replace(cfg.vision.vit, width=32, num_layers=1, num_heads=2, patch_size=8)
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, encoder="vit", vit=vit))


@pytest.fixture(scope="module")
def setup():
    return gates_open_with_prompt(fast_config(), seed=0)


def gates_open_with_prompt(cfg, seed):
    """A model of `cfg` with its gates open and the left-padded two-row prompt."""
    model = Flamingo(cfg, rngs=nnx.Rngs(seed))
    set_gates(model, 0.8)
    vocab = model.cfg.decoder.vocab_size
    pads = P - np.array(LENGTHS)
    valid = np.arange(P)[None] >= pads[:, None]
    tokens = np.where(valid, np.asarray(jax.random.randint(jax.random.key(1), (2, P), 0, vocab)), 0)
    positions = np.maximum(np.arange(P)[None] - pads[:, None], 0).astype(np.int32)
    media = random_media(jax.random.key(2), 2, 2, 1, model.cfg.vision.image_size)
    graphdef, state = nnx.split(model)
    prompt = (tokens, media, MEDIA_INDEX, positions, valid)
    return graphdef, state, prompt


def run_decoding(graphdef, state, prompt, method, *, stop_ids=(-1,), num_beams=1, max_new=NEW, choose=None,
                 layout="scanned"):
    """Prefill and decode in one program, over the scanned stacks or (`layout='unrolled'`) the
    per-layer weights and caches of `models/unrolled.py`."""
    layer_states, options = None, FAST_COMPILE
    if layout == "unrolled":
        graphdef, state, layer_states = unrolled.split_for_decoding(nnx.merge(graphdef, state))
        options = {**FAST_COMPILE, **unrolled.COMPILER_OPTIONS}

    @functools.partial(jax.jit, compiler_options=options)
    def run(state, layer_states, tokens, media, media_index, positions, valid):
        if layer_states is None:
            model = nnx.merge(graphdef, state)
        else:
            model = unrolled.UnrolledFlamingo.merge(graphdef, state, layer_states)
        context = decoding.prefill(model, tokens, media, media_index, positions, valid, P + max_new)
        if method == "beam":
            return decoding.beam_search(model, context, num_beams=num_beams, max_new_tokens=max_new,
                                        stop_ids=stop_ids, pad_id=0)
        return decoding.decode(model, context, jax.random.key(0), max_new_tokens=max_new, stop_ids=stop_ids,
                               pad_id=0, choose=choose or decoding.greedy_chooser())

    bound = functools.partial(run, state, layer_states)
    bound._cache_size = run._cache_size
    bound.hlo = lambda *arrays: run.lower(state, layer_states, *arrays).compile().as_text()
    return bound, jax.tree.map(np.asarray, bound(*prompt))


def uncached_greedy(graphdef, state, prompt):
    """Argmax decoding by full forward passes over the growing, unpadded sequence
    (right-padded to one length: causal attention makes the padding invisible)."""
    tokens, media, media_index, _, _ = prompt
    forward = jax.jit(lambda s, t, m, mi: nnx.merge(graphdef, s)(t, m, mi), compiler_options=FAST_COMPILE)
    out, scores = [], []
    for row, n in enumerate(LENGTHS):
        seq = list(tokens[row, P - n:])
        seen = list(media_index[row, P - n:])
        score = 0.0
        for _ in range(NEW):
            padded = np.zeros((1, P + NEW), np.int32)
            padded[0, :len(seq)] = seq
            index = np.full((1, P + NEW), seen[-1], np.int32)
            index[0, :len(seen)] = seen
            log_probs = jax.nn.log_softmax(forward(state, padded, media[row:row + 1], index)[0, len(seq) - 1])
            token = int(jnp.argmax(log_probs))
            score += float(log_probs[token])
            seq.append(token)
            seen.append(seen[-1])
        out.append(seq[n:])
        scores.append(score)
    return np.array(out), np.array(scores)


def test_cached_greedy_equals_uncached_argmax_for_left_padded_batch(setup):
    graphdef, state, prompt = setup
    _, cached = run_decoding(graphdef, state, prompt, "greedy")
    expected, expected_scores = uncached_greedy(graphdef, state, prompt)
    np.testing.assert_array_equal(cached.tokens, expected)
    np.testing.assert_allclose(cached.scores, expected_scores, rtol=1e-5, atol=1e-4)
    assert len(set(map(tuple, expected))) == 2  # the rows differ: the test would see a mixed-up batch

    # A row stops at its first stop token and is padded after it; the other goes on.
    row, at = next((r, i) for r in range(2) for i in range(1, NEW) if expected[r, i] not in expected[r, :i])
    stop = int(expected[row, at])
    _, stopped = run_decoding(graphdef, state, prompt, "greedy", stop_ids=(stop,))
    np.testing.assert_array_equal(stopped.tokens[row, :at + 1], expected[row, :at + 1])
    assert (stopped.tokens[row, at + 1:] == 0).all() and stopped.lengths[row] == at + 1
    other = 1 - row
    if stop not in expected[other]:
        np.testing.assert_array_equal(stopped.tokens[other], expected[other])
        assert stopped.lengths[other] == NEW


def test_stop_ids_passed_as_an_argument_serve_every_stop_set_from_one_program(setup):
    """What bench/generate.py relies on: one compiled program times 20 tokens and 1 (a stop set
    that the first token hits), so each search keeps one program resident."""
    graphdef, state, prompt = setup
    vocab = nnx.merge(graphdef, state).cfg.decoder.vocab_size

    @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
    def run(method, state, stop_ids, tokens, media, media_index, positions, valid):
        model = nnx.merge(graphdef, state)
        context = decoding.prefill(model, tokens, media, media_index, positions, valid, P + NEW)
        if method == "beam":
            return decoding.beam_search(model, context, num_beams=3, max_new_tokens=NEW, stop_ids=stop_ids, pad_id=0)
        return decoding.decode(model, context, jax.random.key(0), max_new_tokens=NEW, stop_ids=stop_ids, pad_id=0,
                               choose=decoding.greedy_chooser())

    expected, _ = uncached_greedy(graphdef, state, prompt)
    never = run("greedy", state, np.array([-1], np.int32), *prompt)
    np.testing.assert_array_equal(never.tokens, expected)
    assert (np.asarray(never.lengths) == NEW).all()
    first = run("greedy", state, np.array([expected[0, 0]], np.int32), *prompt)
    assert np.asarray(first.lengths)[0] == 1 and (np.asarray(first.tokens)[0, 1:] == 0).all()
    assert run._cache_size() == 1  # both stop sets, one program

    never = run("beam", state, np.full(vocab, -1, np.int32), *prompt)
    every = run("beam", state, np.arange(vocab, dtype=np.int32), *prompt)
    assert (np.asarray(never.lengths) == NEW).all() and (np.asarray(every.lengths) == 1).all()
    assert (np.asarray(every.tokens)[:, 1:] == 0).all()
    assert run._cache_size() == 2  # one program per search


def test_cached_greedy_equals_uncached_argmax_under_openflamingo_placement():
    """Blocks before layers 1, 3 (OpenFlamingo's (i + 1) % 2 == 0 of 4 layers): a lead layer
    without a block, then two groups; the cache holds the lead layer's keys apart."""
    cfg = fast_config()
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, num_layers=4),
                              xattn=dataclasses.replace(cfg.xattn, every=2, first_layer=1))
    assert cfg.xattn_layers == (1, 3) and cfg.xattn_layout == (1, 1, 2, 1)
    graphdef, state, prompt = gates_open_with_prompt(cfg, seed=3)
    _, cached = run_decoding(graphdef, state, prompt, "greedy")
    expected, expected_scores = uncached_greedy(graphdef, state, prompt)
    np.testing.assert_array_equal(cached.tokens, expected)
    np.testing.assert_allclose(cached.scores, expected_scores, rtol=1e-5, atol=1e-4)


def test_unrolled_decoding_equals_uncached_argmax_and_the_scanned_beams(setup):
    """The per-layer path (its own cache layout, the new keys attended beside the cache, the write
    last) decodes what full forward passes do, and beam search over its cache rows matches the
    scanned one's."""
    graphdef, state, prompt = setup
    _, cached = run_decoding(graphdef, state, prompt, "greedy", layout="unrolled")
    expected, expected_scores = uncached_greedy(graphdef, state, prompt)
    np.testing.assert_array_equal(cached.tokens, expected)
    np.testing.assert_allclose(cached.scores, expected_scores, rtol=1e-5, atol=1e-4)
    _, beams = run_decoding(graphdef, state, prompt, "beam", num_beams=3, layout="unrolled")
    _, scanned_beams = run_decoding(graphdef, state, prompt, "beam", num_beams=3)
    np.testing.assert_array_equal(beams.tokens, scanned_beams.tokens)
    np.testing.assert_allclose(beams.scores, scanned_beams.scores, rtol=1e-5, atol=1e-5)


def test_an_unrolled_decoding_step_copies_no_cache_sized_buffer(setup):
    """The compiled decoding loop (what the engine runs) updates each layer's cache in place and
    reads it where it lies: its body holds no copy or transpose of a cache-shaped array."""
    graphdef, state, prompt = setup
    run, _ = run_decoding(graphdef, state, prompt, "greedy", layout="unrolled")
    hlo = run.hlo(*prompt)
    bodies = re.findall(r"while\(.*?body=(%[\w.\-]+)", hlo)
    body = max((re.search(r"\n" + re.escape(name) + r" .*?\n}\n", hlo, re.DOTALL).group(0) for name in bodies), key=len)
    cfg = fast_config().decoder
    heads, slots = cfg.num_kv_heads or cfg.num_heads, P + NEW
    cache_shapes = [f"f32[2,{heads},{slots},{cfg.head_dim}]", f"f32[2,{heads},{cfg.head_dim},{slots}]"]
    assert all(shape in body for shape in cache_shapes)  # the loop carries the caches
    moved = [line for line in body.splitlines()
             if re.search(r"= \S+ (copy|transpose)\(", line) and any(shape in line for shape in cache_shapes)]
    assert not moved, moved


@pytest.mark.parametrize("positions", ["relative", "alibi"])
def test_unrolled_decoding_equals_uncached_argmax_with_distance_biases(positions):
    """Relative (Chinchilla's) and ALiBi positions, blocks OpenFlamingo-placed (a lead layer): the
    new token's distance to itself and to the cache is biased as in a full forward pass."""
    cfg = fast_config()
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, num_layers=4, positions=positions),
                              xattn=dataclasses.replace(cfg.xattn, every=2, first_layer=1))
    graphdef, state, prompt = gates_open_with_prompt(cfg, seed=4)
    _, cached = run_decoding(graphdef, state, prompt, "greedy", layout="unrolled")
    expected, expected_scores = uncached_greedy(graphdef, state, prompt)
    np.testing.assert_array_equal(cached.tokens, expected)
    np.testing.assert_allclose(cached.scores, expected_scores, rtol=1e-5, atol=1e-4)


def test_beam_one_is_greedy_and_beam_three_scores_at_least_greedy(setup):
    graphdef, state, prompt = setup
    _, greedy = run_decoding(graphdef, state, prompt, "greedy")
    _, beam1 = run_decoding(graphdef, state, prompt, "beam", num_beams=1)
    np.testing.assert_array_equal(beam1.tokens, greedy.tokens)
    np.testing.assert_allclose(beam1.scores, greedy.scores, rtol=1e-5)
    _, beam3 = run_decoding(graphdef, state, prompt, "beam", num_beams=3)
    assert (beam3.scores >= greedy.scores - 1e-4).all(), (beam3.scores, greedy.scores)
    # The returned score is the returned sequence's log-probability, checked by full forward passes.
    tokens, media, media_index, _, _ = prompt
    forward = jax.jit(lambda s, t, m, mi: nnx.merge(graphdef, s)(t, m, mi), compiler_options=FAST_COMPILE)
    for row, n in enumerate(LENGTHS):
        seq = np.concatenate([tokens[row, P - n:], beam3.tokens[row]])[None]
        index = np.concatenate([media_index[row, P - n:], np.full(NEW, media_index[row, -1])])[None]
        log_probs = jax.nn.log_softmax(forward(state, seq, media[row:row + 1], index)[0])
        expected = sum(float(log_probs[n - 1 + i, seq[0, n + i]]) for i in range(NEW))
        np.testing.assert_allclose(beam3.scores[row], expected, rtol=1e-4)


def test_decoding_twenty_tokens_compiles_the_step_once(setup):
    graphdef, state, prompt = setup
    traces = []

    def counting_greedy(logits, key):
        traces.append(1)  # runs when the step is traced, not per token
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    run, first = run_decoding(graphdef, state, prompt, "greedy", max_new=20, choose=counting_greedy)
    other = (prompt[0][::-1].copy(),) + prompt[1:]
    second = run(*other)
    assert first.tokens.shape == (2, 20) and (first.lengths == 20).all()
    assert len(traces) == 1 and run._cache_size() == 1
    assert not np.array_equal(np.asarray(second.tokens), first.tokens)


def test_cached_candidate_loglikelihood_equals_full_forward(setup):
    graphdef, state, prompt = setup
    tokens, media, media_index, positions, valid = prompt
    candidates = np.array([[[5, 9, 11, 0], [7, 0, 0, 0], [300, 2, 4, 8]]] * 2, np.int32)
    candidate_valid = np.array([[[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]] * 2, bool)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def score(state):
        model = nnx.merge(graphdef, state)
        context = decoding.prefill(model, tokens, media, media_index, positions, valid, P + 4)
        return decoding.score_continuations(model, context, candidates, candidate_valid)

    cached = np.asarray(score(state))
    forward = jax.jit(lambda s, t, m, mi: nnx.merge(graphdef, s)(t, m, mi), compiler_options=FAST_COMPILE)
    for row, n in enumerate(LENGTHS):
        for c in range(3):
            cand = candidates[row, c][candidate_valid[row, c]]
            seq = np.concatenate([tokens[row, P - n:], candidates[row, c]])[None]
            index = np.concatenate([media_index[row, P - n:], np.full(4, media_index[row, -1])])[None]
            log_probs = jax.nn.log_softmax(forward(state, seq, media[row:row + 1], index)[0])
            expected = sum(float(log_probs[n - 1 + i, t]) for i, t in enumerate(cand))
            np.testing.assert_allclose(cached[row, c], expected, rtol=1e-5, atol=1e-4)
    assert cached[0, 1] > cached[0, 0]  # one token is likelier than three: the masks count


def test_sampling_top_k_one_is_greedy_and_seeds_differ(setup):
    graphdef, state, prompt = setup
    _, greedy = run_decoding(graphdef, state, prompt, "greedy")
    _, top1 = run_decoding(graphdef, state, prompt, "sample", choose=decoding.sampling_chooser(1.0, top_k=1))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    _, nucleus = run_decoding(graphdef, state, prompt, "sample", choose=decoding.sampling_chooser(1.0, top_p=1e-6))
    np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)
    hot = decoding.sampling_chooser(5.0)
    logits = jnp.zeros((4, 512))
    draws = {tuple(np.asarray(hot(logits, jax.random.key(seed)))) for seed in range(3)}
    assert len(draws) == 3
    with pytest.raises(ValueError, match="temperature"):
        decoding.sampling_chooser(0.0)
