"""Video QA as the paper evaluates it: the synthetic held-out video QA family (30 frames at 3 FPS),
the frame-sampling rule, and `synthetic_video_qa` through the evaluator on a model trained with
fewer frames than it is evaluated with."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from flamingo_jax.data import synthetic
from flamingo_jax.data.frames import sample_indices
from flamingo_jax.errors import UserError
from flamingo_jax.evaluation import readers, tasks
from flamingo_jax.evaluation.evaluator import EvalSettings, Evaluator
from flamingo_jax.inference import prompting
from flamingo_jax.inference.engine import Engine
from flamingo_jax.inference.items import Media

from helpers import training_texts


def _spec(corpus: str) -> dict:
    with open(os.path.join(corpus, "eval", "tasks.json")) as f:
        return json.load(f)["video_qa"]


def _centre_and_area(frame: np.ndarray, colour: str) -> tuple[np.ndarray, int]:
    """Centroid (x, y) and pixel count of the frame's pixels near `colour` (JPEG-tolerant)."""
    near = np.abs(frame.astype(int) - np.asarray(synthetic.COLOURS[colour])).sum(-1) < 60
    ys, xs = np.nonzero(near)
    return np.array([xs.mean(), ys.mean()]), int(near.sum())


def test_video_qa_clips_parse_with_the_msvd_reader_and_answers_are_the_motion_seen(synthetic_corpus):
    spec = _spec(synthetic_corpus)
    assert (spec["format"], spec["fps"], spec["seconds"], spec["num_frames"]) == ("msvd_qa", 3.0, 10.0, 30)
    eval_dir = Path(synthetic_corpus) / "eval"
    support, queries = (readers.read_video_qa(eval_dir / spec[split], eval_dir / spec["frames"], check_frames=True,
                                              video_dir_template=spec["video_dir_template"])
                        for split in ("support", "query"))
    assert (len(support), len(queries)) == (8, 8)  # num_eval=16: half support, half queries
    assert {e.id for e in support}.isdisjoint(e.id for e in queries)
    checked = 0
    for example in support + queries:
        frames = readers.list_frames(example.frames_dir)
        assert [p.name for p in frames] == [f"frame{k}.jpg" for k in range(1, 31)]  # natural order = time
        assert example.answer in synthetic.MOTIONS
        words = example.question.split()
        assert example.question == f"How does the {words[3]} {words[4]} change during the video?"
        colour = words[3]
        if colour in ("white", "black"):  # close to the textures' light and dark tones
            continue
        # A growing shape starts a pixel or two wide (JPEG may blur it away): compare from mid-clip.
        first = frames[14] if example.answer == "bigger" else frames[0]
        (x0, y0), area0 = _centre_and_area(np.asarray(Image.open(first)), colour)
        (x1, y1), area1 = _centre_and_area(np.asarray(Image.open(frames[-1])), colour)
        moved = {"right": x1 - x0, "left": x0 - x1, "down": y1 - y0, "up": y0 - y1}
        if example.answer == "bigger":
            assert area1 > 2 * area0 > 0 and max(abs(v) for v in moved.values()) < 2, example
        else:
            assert moved[example.answer] > 0.3 * 32 and max(abs(v) for v in moved.values()) == moved[
                example.answer], example
        checked += 1
    assert checked >= 8
    # The task reads the same files and knows their stored rate.
    task_support, task_queries = tasks.get_task("synthetic_video_qa").load(Path(synthetic_corpus))
    assert [(e.frames_dir, e.question, e.answer) for e in task_queries] == [
        (e.frames_dir, e.question, e.answer) for e in queries]
    media = tasks.get_task("synthetic_video_qa").media(task_support[0])
    assert media.fps == 3.0 and len(media.frames) == 30


def test_the_video_question_is_held_out_from_every_training_text(synthetic_corpus):
    texts = training_texts(synthetic_corpus)
    assert len(texts) > 64 and any(" moves " in t for t in texts)  # the training videos' captions are here
    template = synthetic.motion_question(synthetic.Shape("star", "green", False, (0, 0)))
    fixed = template.replace("green star", "|").split("|")  # "How does the ", " change during the video?"
    assert all(part.strip() for part in fixed)
    for text in texts:
        assert not any(part.strip() in text for part in fixed), text


def test_sample_indices_at_the_target_rate_or_evenly_over_the_clip():
    assert sample_indices(30, 30, stored_fps=3.0, fps=3.0) == list(range(30))  # the corpus: every frame
    assert sample_indices(60, 30, stored_fps=6.0, fps=3.0) == list(range(0, 60, 2))
    assert sample_indices(100, 4, stored_fps=2.0, fps=1.0) == [46, 48, 50, 52]  # a window centred in the clip
    assert sample_indices(5, 4, stored_fps=1.0, fps=1.0) == [0, 1, 2, 3]
    assert sample_indices(3, 5, stored_fps=3.0, fps=3.0) == [0, 1, 2, 2, 2]  # short clip: last frame repeated
    assert sample_indices(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]  # rate unknown: first to last, evenly
    assert sample_indices(30, 30, stored_fps=3.0) == list(range(30))
    assert sample_indices(2, 4) == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="both must be >= 1"):
        sample_indices(0, 4)


def test_impossible_video_settings_are_named():
    with pytest.raises(UserError, match="--video_frames=0 must be >= 1"):
        EvalSettings(video_frames=0)
    with pytest.raises(UserError, match="--video_fps=-3.0 must be > 0"):
        EvalSettings(video_fps=-3.0)
    with pytest.raises(prompting.PromptError, match="at least 1 frame"):
        prompting.MediaLoader(prompting.image_ops.ImageConfig(size=8), num_frames=0)
    with pytest.raises(prompting.PromptError, match="must be > 0 frames per second"):
        prompting.MediaLoader(prompting.image_ops.ImageConfig(size=8), num_frames=4, fps=0.0)
    with pytest.raises(ValueError, match="Media.fps must be > 0"):
        Media(frames=["a.jpg"], fps=0)
    with pytest.raises(synthetic.DataError, match="at least 2 frames"):
        synthetic.eval_video_frames(0.3, 3.0)


def test_synthetic_video_qa_through_the_evaluator_feeds_30_frames(trained_run, synthetic_corpus):
    """The trained run's model has an 8-row temporal table; the evaluator feeds it 30 frames
    (the temporal embeddings interpolated) at 0 and 1 shots."""
    engine = Engine.from_workdir(str(trained_run / "run"))
    assert engine.cfg.vision.num_frames < 30
    settings = EvalSettings(shots=(0, 1), num_queries=2, batch_size=2, num_beams=2)
    evaluator = Evaluator(engine, settings)
    assert evaluator.engine.load_media.num_frames == 30 and engine.load_media.num_frames == engine.cfg.vision.num_frames
    shapes, encoded = [], []
    original_prefill, original_encode = Engine.prefill, Engine.visual_tokens

    def recording_prefill(self, batch, num_new):
        shapes.append(batch.media.shape)
        return original_prefill(self, batch, num_new)

    def recording_encode(self, media):
        encoded.extend(self.load_media(m).shape for m in media)
        return original_encode(self, media)

    with mock.patch.object(Engine, "prefill", recording_prefill), mock.patch.object(Engine, "visual_tokens",
                                                                                    recording_encode):
        results = evaluator.evaluate(tasks.get_task("synthetic_video_qa"), Path(synthetic_corpus))
    assert set(results) == {"0", "1"}
    for entry in results.values():
        assert entry["num_queries"] == 2 and 0 <= entry["top1_accuracy"] <= 100
    assert {shape[0] for shape in encoded} == {30}  # [T, S, S, 3]: 30 frames per video
    # [B, M, R, D]: each video as the Resampler's tokens
    assert {shape[2:] for shape in shapes} == {(engine.cfg.resampler.num_latents, engine.cfg.resampler.dim)}
    assert sorted({shape[1] for shape in shapes}) == [1, 2]  # 0 shots: the query alone; 1 shot: two videos
