"""Prompt items -> token ids, media association and padded batches (no model)."""

import os
import re
import types

import numpy as np
import pytest

from flamingo_jax.data.images import ImageConfig, encode_image
from flamingo_jax.data.tokenizer import Tokenizer
from flamingo_jax.inference import prompting
from flamingo_jax.inference.items import END_OF_CHUNK, Media


@pytest.fixture(scope="module")
def tokenizer(synthetic_corpus):
    return Tokenizer(os.path.join(synthetic_corpus, "spm.model"))


def image(value: int, size: int = 20) -> Media:
    return Media(array=np.full((size, size + 4, 3), value, np.uint8))


def test_encode_prompt_marks_images_and_what_each_token_sees(tokenizer):
    items = ["a photo", image(1), "Output: a cat", END_OF_CHUNK, image(2), "Output:"]
    encoded = prompting.encode_prompt(items, tokenizer)
    ids = list(encoded.ids)
    markers = [i for i in range(len(ids)) if ids[i:i + len(tokenizer.image_marker_ids)]
               == list(tokenizer.image_marker_ids)]
    assert len(markers) == 2 and len(encoded.media) == 2
    eoc = ids.index(tokenizer.eoc_id)
    assert markers[0] < eoc < markers[1]
    expected = np.full(len(ids), -1)
    expected[markers[0]:markers[1]] = 0
    expected[markers[1]:] = 1
    np.testing.assert_array_equal(encoded.media_index, expected)  # text before any image sees none
    assert tokenizer.decode(ids[markers[1] + len(tokenizer.image_marker_ids):]).strip() == "Output:"


def test_openflamingo_association_counts_image_ids_and_needs_a_one_id_marker(tokenizer):
    items = ["a photo", image(1), "Output: a cat", END_OF_CHUNK, image(2), image(3), "Output:"]
    ours = prompting.encode_prompt(items, tokenizer)
    theirs = prompting.encode_prompt(items, tokenizer, media_association="openflamingo")
    np.testing.assert_array_equal(theirs.ids, ours.ids)
    assert len(tokenizer.image_marker_ids) == 1  # trained with <image> as a symbol: the two rules agree
    np.testing.assert_array_equal(theirs.media_index, ours.media_index)
    marker = tokenizer.image_marker_ids[0]
    np.testing.assert_array_equal(theirs.media_index, np.cumsum(theirs.ids == marker) - 1)
    plain_text_marker = types.SimpleNamespace(image_marker_ids=(7, 8, 9))
    with pytest.raises(prompting.PromptError, match="one token id"):
        prompting.encode_prompt(items, plain_text_marker, media_association="openflamingo")


def test_encode_prompt_rejects_unknown_items_and_empty_prompts(tokenizer):
    with pytest.raises(prompting.PromptError, match="item 1 is a int"):
        prompting.encode_prompt(["text", 3], tokenizer)
    if tokenizer.bos_id is None:
        with pytest.raises(prompting.PromptError, match="empty"):
            prompting.encode_prompt([], tokenizer)
    else:
        assert list(prompting.encode_prompt([], tokenizer).ids) == [tokenizer.bos_id]


def test_parse_prompt_reads_the_cli_syntax(tmp_path):
    frames = tmp_path / "clip"
    frames.mkdir()
    for i in (10, 2, 1):
        (frames / f"f{i}.png").write_bytes(encode_image(np.zeros((4, 4, 3), np.uint8), "PNG"))
    items = prompting.parse_prompt("<image:cat.jpg> Output: a cat<EOC><video:clip> Question: what? Answer:", tmp_path)
    assert items[0].path == tmp_path / "cat.jpg"
    assert items[1:3] == ["Output: a cat", END_OF_CHUNK]
    assert [p.name for p in items[3].frames] == ["f1.png", "f2.png", "f10.png"]  # time order, not text order
    assert items[4] == "Question: what? Answer:"
    with pytest.raises(prompting.PromptError, match="does not exist"):
        prompting.parse_prompt("<video:missing>", tmp_path)


def test_make_batch_left_pads_to_power_of_two_buckets(tokenizer):
    load = prompting.MediaLoader(ImageConfig(size=16), num_frames=4)
    short = prompting.encode_prompt([image(3), "Output:"], tokenizer)
    long = prompting.encode_prompt([image(1), "Output: a red square", END_OF_CHUNK, image(2), image(5), "Output:"],
                                   tokenizer)
    batch = prompting.make_batch([short, long], load, pad_id=0, min_length=8, batch_size=3)
    length = batch.tokens.shape[1]
    assert length == max(8, 1 << (len(long.ids) - 1).bit_length())  # the next power of two
    assert batch.tokens.shape[0] == 3 and batch.media.shape == (3, 4, 1, 16, 16, 3)  # 3 images -> 4 slots
    for row, prompt in enumerate([short, long, long]):
        n = len(prompt.ids)
        np.testing.assert_array_equal(batch.tokens[row, -n:], prompt.ids)
        np.testing.assert_array_equal(batch.positions[row, -n:], np.arange(n))
        assert batch.valid[row].sum() == n and batch.valid[row, -n:].all()
        np.testing.assert_array_equal(batch.media_index[row, :-n], -1)
    assert np.abs(batch.media[0, 1:]).max() == 0  # unused slots stay empty
    assert not np.array_equal(batch.media[1, 0], batch.media[1, 1])  # different images, different pixels
    with pytest.raises(prompting.PromptError, match="exceeds the model's 5-token context"):
        prompting.make_batch([long], load, pad_id=0, max_length=5)


def test_prompt_lengths_round_to_powers_of_two_then_to_multiples_of_the_step():
    step = prompting.LENGTH_STEP
    assert [prompting.bucket_length(n, 8) for n in (3, 9, step - 1, step)] == [8, 16, step, step]
    assert [prompting.bucket_length(n, 8) for n in (step + 1, 298, 4 * step)] == [2 * step, 320, 4 * step]
    assert prompting.bucket_length(10, 32) == 32


def test_media_loader_prepares_images_videos_and_names_bad_files(tmp_path):
    load = prompting.MediaLoader(ImageConfig(size=16), num_frames=3)
    pixels = load(image(255))
    assert pixels.shape == (1, 16, 16, 3)
    # Non-square images are mean-padded, as in training: the padding is 0 after normalisation.
    assert np.abs(pixels[0, 0]).max() == 0 and pixels[0, 8].max() > 1
    video = load(Media(array=np.stack([np.full((8, 8, 3), v, np.uint8) for v in range(5)])))
    assert video.shape == (3, 16, 16, 3)
    assert video[0].mean() < video[1].mean() < video[2].mean()  # evenly spaced frames, in order
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(prompting.PromptError, match="broken.jpg cannot be decoded"):
        load(Media(path=bad))
    with pytest.raises(prompting.PromptError, match="does not exist"):
        load(Media(path=tmp_path / "absent.jpg"))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        Media(array=np.zeros((8, 8), np.uint8))


def test_a_blind_loader_shows_the_mean_image_for_every_image_and_frame(tokenizer):
    load = prompting.MediaLoader(ImageConfig(size=16), num_frames=3)
    clip = Media(array=np.stack([np.full((8, 8, 3), v, np.uint8) for v in (10, 90, 170, 250)]))
    media = [image(40, 16), image(200, 16), clip]
    mean = prompting.mean_image(load, media)
    frames = np.concatenate([load(item) for item in media])  # 1 + 1 + 3 prepared frames
    assert mean.shape == (16, 16, 3) and frames.shape[0] == 5
    np.testing.assert_allclose(mean, frames.mean(axis=0), rtol=1e-6, atol=1e-6)
    blind = prompting.BlindLoader(load, mean)
    assert blind(image(7, 16)).shape == (1, 16, 16, 3) and blind(clip).shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(blind(clip)[2], mean)
    prompts = [prompting.encode_prompt([item, "Output:"], tokenizer) for item in media[:2]]
    batch = prompting.make_batch(prompts, blind, pad_id=0, min_length=8)
    np.testing.assert_array_equal(batch.media[0, 0], batch.media[1, 0])  # two images, one picture seen
    assert not np.array_equal(load(media[0]), load(media[1]))
    with pytest.raises(ValueError, match=r"\[16, 16, 3\]"):
        prompting.BlindLoader(load, np.zeros((8, 8, 3), np.float32))


@pytest.mark.parametrize("prompt, named", [
    ("<image:> Output:", "'<image:>'"),
    ("<image:cat.jpg Output:", "'<image:cat.jpg Output:'"),
    ("Look: <image> Output:", "'<image>'"),
    ("<video:  > what moves?", "'<video:  >'"),
])
def test_a_malformed_media_tag_is_an_error_naming_it(prompt, named):
    with pytest.raises(prompting.PromptError, match=f"malformed media tag {re.escape(named)}|media tag "
                                                     f"{re.escape(named)} names no file"):
        prompting.parse_prompt(prompt)


def test_frame_listing_is_in_time_order_for_every_reader(tmp_path):
    """Prompts, eval readers and the video importer list frames with one function: digit runs
    compare as numbers (f2 before f10), other files and folders are left out."""
    from flamingo_jax.data import frames as frame_files

    for name in ("f10.png", "f2.PNG", "f1.jpg", "notes.txt", "f11.gif"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "f3.png").mkdir()
    listed = [p.name for p in frame_files.list_frames(tmp_path, (".png", ".jpg"))]
    assert listed == ["f1.jpg", "f2.PNG", "f10.png"]
    assert sorted(["v1_f10", "v1_f9", "v10_f1", "v2_f1"], key=frame_files.natural_key) == \
        ["v1_f9", "v1_f10", "v2_f1", "v10_f1"]


def test_a_continuation_is_tokenized_as_the_rest_of_the_prompts_last_text(tokenizer):
    """" yes" after "Answer:" must be the ids "Answer: yes" ends with; encoded alone it starts with
    an extra piece (the tokenizer's dummy prefix) that no training text puts before an answer."""
    prompt = [image(1), "Question: What colour is the star? Answer:"]
    whole = tokenizer.encode(prompt[-1] + " yes")
    head = tokenizer.encode(prompt[-1])
    ids = prompting.continuation_ids(prompt, " yes", tokenizer)
    assert whole[:len(head)] == head and ids == whole[len(head):]
    assert tokenizer.encode(" yes") != ids  # the old scoring: one piece too many
    # After media the text starts an item of its own, as in training.
    assert prompting.continuation_ids([image(1)], "Output: a cat", tokenizer) == tokenizer.encode("Output: a cat")
