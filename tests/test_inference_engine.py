"""The inference API and the evaluate CLI on a checkpoint written by training."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from test_inference_decoding import fast_config

from flamingo_jax.data.images import ImageConfig
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.evaluation.evaluator import EvalSettings, Evaluator
from flamingo_jax.evaluation.rices import RicesIndex
from flamingo_jax.evaluation.tasks import get_task
from flamingo_jax.inference.engine import DecodeOptions, Engine, VisualTokenCache
from flamingo_jax.inference.items import END_OF_CHUNK, Media
from flamingo_jax.inference.prompting import mean_image
from flamingo_jax.models.flamingo import Flamingo

from helpers import flat_arrays, set_gates, trained_logits


@pytest.fixture(scope="module")
def engine(synthetic_corpus):
    model = Flamingo(fast_config(), rngs=nnx.Rngs(3))
    set_gates(model, 0.8)
    tokenizer = Tokenizer(os.path.join(synthetic_corpus, "spm.model"))
    return Engine(model, tokenizer, ImageConfig(size=model.cfg.vision.image_size), min_length=16)


def picture(value: int) -> Media:
    rng = np.random.default_rng(value)
    return Media(array=rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))


PROMPTS = [
    [picture(1), "Output: a red square", END_OF_CHUNK, picture(2), "Output:"],
    [picture(3), "Question: Where is the star? Answer:"],
]
GREEDY = DecodeOptions(method="greedy", max_new_tokens=5)


def test_batched_generation_equals_one_prompt_at_a_time(engine):
    together = engine.generate_ids(PROMPTS, GREEDY, batch_size=2)
    for row, prompt in enumerate(PROMPTS):
        alone = engine.generate_ids([prompt], GREEDY, batch_size=2)  # padded by repeating the prompt
        np.testing.assert_array_equal(together.tokens[row], alone.tokens[0])
        np.testing.assert_allclose(together.scores[row], alone.scores[0], rtol=1e-5)
    texts = engine.generate(PROMPTS, GREEDY, batch_size=2)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_images_change_what_is_generated_and_scored(engine):
    other = [[picture(9), *PROMPTS[0][1:3], picture(8), "Output:"]]
    base = engine.score(PROMPTS[:1], [["a red square", "a blue star"]])[0]
    changed = engine.score(other, [["a red square", "a blue star"]])[0]
    assert base.shape == (2,) and np.all(base < 0)
    assert np.abs(base - changed).max() > 1e-4


def test_scores_agree_with_generation(engine):
    """Greedy's first token is the likeliest, so no one-token candidate may score above
    its log-probability, and some candidates must score well below it."""
    tokenizer = engine.tokenizer
    greedy = engine.generate_ids(PROMPTS[:1], DecodeOptions(method="greedy", max_new_tokens=1))
    single = [i for i in range(tokenizer.vocab_size) if tokenizer.encode(tokenizer.decode([i])) == [i]][:16]
    scores = engine.score(PROMPTS[:1], [[tokenizer.decode([i]) for i in single]], end_with_eoc=False)[0]
    assert scores.max() <= greedy.scores[0] + 1e-4, (scores.max(), greedy.scores[0])
    assert scores.min() < greedy.scores[0] - 0.1
    if int(greedy.tokens[0, 0]) in single:
        np.testing.assert_allclose(scores[single.index(int(greedy.tokens[0, 0]))], greedy.scores[0], rtol=1e-5)


def test_a_candidates_score_is_its_tokens_log_probability_after_the_prompt(engine):
    """Chain rule over the prompt's own tokenization: p(" a red square" | "Output:") =
    p(" a" | "Output:") * p(" red square" | "Output: a"). It fails if a candidate is scored as a
    text of its own (an extra leading piece on each part)."""
    head = [picture(1), "Output:"]
    whole = engine.score([head], [[" a red square"]], end_with_eoc=False)[0][0]
    first = engine.score([head], [[" a"]], end_with_eoc=False)[0][0]
    rest = engine.score([[picture(1), "Output: a"]], [[" red square"]], end_with_eoc=False)[0][0]
    np.testing.assert_allclose(whole, first + rest, rtol=1e-4)


def test_each_media_item_is_encoded_once_by_content_and_per_loader(engine, monkeypatch, tmp_path):
    """A few-shot evaluation shows each support image in many prompts (and prompt ensembling
    each prompt six times), each time as a new Media: the engine encodes an item's content
    once, its prefill from those visual tokens equals the prefill from pixels, a blind engine
    does not reuse what the seeing one encoded, and an edited file is read again."""
    import jax
    from PIL import Image

    from flamingo_jax.inference import decoding

    encoded = []
    encode = engine._encode
    monkeypatch.setattr(engine, "_encode", lambda state, pixels: encoded.append(len(pixels)) or encode(state, pixels))

    def prompts():  # new Media objects every time, as the evaluator's templates make them
        a, b = picture(21), picture(22)
        return [[a, "Output: a red square", END_OF_CHUNK, b, "Output:"], [b, "Output: a star", END_OF_CHUNK, a, "Output:"]]

    first = engine.score(prompts(), [["a red square", "a blue star"]] * 2)
    assert encoded == [2]  # two items, four appearances
    again = engine.score(prompts(), [["a red square", "a blue star"]] * 2)
    assert encoded == [2]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))

    pixels, visual = engine.batch(prompts()), engine.visual_batch(prompts())
    np.testing.assert_array_equal(pixels.tokens, visual.tokens)
    text_only = engine.visual_batch([["Output: a red square"]]).media  # no media: the same program's arrays
    assert text_only.shape[2:] == visual.media.shape[2:] and text_only.dtype == visual.media.dtype
    from_pixels = jax.jit(lambda s, ls, *arrays: decoding.prefill(engine._model(s, ls), *arrays, 40).last_logits)
    np.testing.assert_allclose(np.asarray(from_pixels(engine.state, engine.layer_states, *pixels.arrays())),
                               np.asarray(engine.prefill(visual, 40 - visual.tokens.shape[1]).last_logits),
                               rtol=1e-5, atol=1e-5)

    seeing = engine.visual_tokens([picture(21)])[0]
    with engine.blind([picture(21), picture(22)]):
        blind = engine.visual_tokens([picture(21), picture(22)])
    assert encoded == [2, 2] and np.abs(blind[0] - seeing).max() > 1e-4
    np.testing.assert_array_equal(blind[0], blind[1])  # both are the mean image

    path = tmp_path / "edited.png"
    Image.fromarray(picture(23).array).save(path)
    before = engine.visual_tokens([Media(path=path)])[0]
    assert engine.visual_tokens([Media(path=path)])[0] is before and encoded == [2, 2, 1]
    Image.fromarray(picture(24).array).save(path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    after = engine.visual_tokens([Media(path=path)])[0]
    assert encoded == [2, 2, 1, 1] and np.abs(after - before).max() > 1e-4


def test_the_visual_token_cache_drops_the_least_recently_used_past_its_size():
    cache = VisualTokenCache(max_bytes=2 * 400)
    arrays = {name: np.full(100, i, np.float32) for i, name in enumerate("abc")}  # 400 bytes each
    cache.put("a", arrays["a"])
    cache.put("b", arrays["b"])
    assert cache.get("a") is arrays["a"]  # a is now the most recent
    cache.put("c", arrays["c"])
    assert len(cache) == 2 and cache.get("b") is None and cache.get("a") is arrays["a"]


def test_decode_options_are_checked():
    with pytest.raises(ValueError, match="unknown"):
        DecodeOptions(method="nucleus")
    with pytest.raises(ValueError, match="max_new_tokens"):
        DecodeOptions(max_new_tokens=0)


def test_a_30_frame_clip_reaches_a_model_with_fewer_temporal_embeddings(engine):
    """`with_video(30, 3)` feeds every frame of a 10 s clip stored at 3 FPS to a model whose
    temporal table has 8 rows (interpolated to 30); a change to the 30th frame alone changes the
    logits of every token after the video's marker and of none before it. The engine's default
    (the model's 8 frames, evenly spaced) never sees the 29th."""
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 255, (30, 16, 16, 3), dtype=np.uint8)
    last, penultimate = clip.copy(), clip.copy()
    last[29] = 255 - last[29]
    penultimate[28] = 255 - penultimate[28]
    prompts = [["Before the clip:", Media(array=frames, fps=3.0), "Question: How does it change? Answer: right"]
               for frames in (clip, last, penultimate)]
    assert engine.cfg.vision.num_frames == 8
    default = engine.batch(prompts)
    assert default.media.shape[2] == 8 and np.array_equal(default.media[0], default.media[2])
    batch = engine.with_video(30, 3.0).batch(prompts)
    assert batch.media.shape[1:3] == (1, 30)
    changed = [np.abs(batch.media[1, 0, k] - batch.media[0, 0, k]).max() > 0 for k in range(30)]
    assert changed == [False] * 29 + [True]
    forward = nnx.jit(lambda m, *arrays: m(*arrays))
    logits = np.asarray(forward(engine.model, batch.tokens, batch.media,
                                batch.media_index, batch.positions, batch.valid))
    before = batch.valid[0] & (batch.media_index[0] < 0)
    after = batch.media_index[0] >= 0
    assert before.sum() >= 3 and after.sum() >= 8
    np.testing.assert_array_equal(logits[1, before], logits[0, before])
    np.testing.assert_array_equal(logits[2, before], logits[0, before])
    for row in (1, 2):
        assert np.all(np.abs(logits[row, after] - logits[0, after]).max(-1) > 1e-6), row


def test_evaluate_cli_on_a_trained_checkpoint_writes_json_and_table(trained_run, synthetic_corpus, tmp_path, run_cli):
    """Acceptance: train (a few steps) -> checkpoint -> evaluate the synthetic held-out tasks at 0 and 4 shots."""
    done = run_cli("flamingo_jax.evaluate", f"--workdir={trained_run / 'run'}", f"--data_dir={synthetic_corpus}",
                   "--shots=0,4", "--num_queries=4", "--batch_size=4", "--ensemble=2", "--num_beams=2",
                   f"--output_dir={tmp_path / 'eval'}", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = (tmp_path / "eval").glob("step_2.*.json")
    assert json_path.name.startswith("step_2.4-tasks.shots-0-4.")  # the four synthetic held-out tasks
    results = json.loads(json_path.read_text())
    assert results["meta"]["step"] == 2
    assert results["meta"]["prompts"] == "flamingo" and results["meta"]["vqa_normalization"] == "always"
    assert (results["meta"]["settings"]["video_frames"], results["meta"]["settings"]["video_fps"]) == (30, 3.0)
    # CIDEr is reported x100 (a perfect caption set scores up to 1000); the others are percentages.
    for task, metric, top in (("synthetic_captioning", "cider", 1000), ("synthetic_vqa", "vqa_accuracy", 100),
                              ("synthetic_classification", "roc_auc", 100),
                              ("synthetic_video_qa", "top1_accuracy", 100)):
        for shots in ("0", "4"):
            entry = results["results"][task][shots]
            assert entry["num_queries"] == 4 and metric in entry
            assert np.isnan(entry[metric]) or 0 <= entry[metric] <= top
    table = json_path.with_suffix(".md").read_text()
    assert "| synthetic_vqa | vqa_accuracy |" in table and "4-shot" in table
    assert "ETA" in done.stderr  # the progress line
    assert results["meta"]["blind"] is False


def test_a_blind_evaluation_shows_every_prompt_the_tasks_mean_image(trained_run, synthetic_corpus, monkeypatch):
    """What the model sees of each query (its vision features), and what RICES picks by them:
    under blind, one image for all queries (the mean of the task's prepared images), the same
    support examples for each; in the normal run, as many images as queries."""
    engine = Engine.from_workdir(str(trained_run / "run"))
    seeing = engine.load_media
    task = get_task("synthetic_classification")
    assert task.rices

    def features_seen(self, task, support_pool, queries):  # in place of decoding: what the engine shows
        images = [task.media(example) for example in [*support_pool, *queries]]
        rices = RicesIndex.from_pool(support_pool, task.media, self.engine.media_features, batch_size=4)
        features = self.engine.media_features([task.media(q) for q in queries], batch_size=4)
        return {"features": features, "rices": rices.select(features, 3),
                "image": getattr(self.engine.load_media, "image", None), "expected": mean_image(seeing, images)}

    monkeypatch.setattr(Evaluator, "_evaluate", features_seen)
    settings = EvalSettings(shots=(4,), num_queries=4, support_size=8, batch_size=4)
    blind = Evaluator(engine, settings, blind=True).evaluate(task, Path(synthetic_corpus))
    normal = Evaluator(engine, settings).evaluate(task, Path(synthetic_corpus))
    assert engine.load_media is seeing  # the engine sees again after the task
    np.testing.assert_array_equal(blind["image"], blind["expected"])
    assert blind["features"].shape == (4, normal["features"].shape[1])
    for row in blind["features"][1:]:
        np.testing.assert_array_equal(row, blind["features"][0])
    assert (blind["rices"] == blind["rices"][0]).all()
    assert normal["image"] is None
    assert all(np.abs(normal["features"][i] - normal["features"][j]).max() > 1e-4
               for i in range(4) for j in range(i + 1, 4))


def test_a_reloaded_engine_holds_the_trainers_last_weights_bit_for_bit(trained_run):
    """Engine.from_workdir (load_trained) restores exactly what training ended with: every
    trainable weight, and the same logits on a fixed input (frozen parts re-created from the seed)."""
    with open(trained_run / "trained_params.pkl", "rb") as f:
        trained = pickle.load(f)
    engine = Engine.from_workdir(str(trained_run / "run"))
    assert engine.step == 2
    reloaded = flat_arrays(nnx.to_pure_dict(nnx.state(engine.model)))
    assert trained and set(trained) <= set(reloaded)
    for path, value in trained.items():
        assert reloaded[path].dtype == value.dtype, path
        np.testing.assert_array_equal(reloaded[path], value, err_msg=path)
    np.testing.assert_array_equal(trained_logits(engine.model),
                                  np.load(trained_run / "trained_logits.npy"))
