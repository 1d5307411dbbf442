"""Image-text and video-text pairs; image preprocessing (aspect ratio, mean padding, flips)."""

import numpy as np
import pytest

from flamingo_jax.data import formats, images, pairs

from test_data_utils import check_contract, collect, make_tokenizer, occupied_slots, red_value, rows, solid_png

IMAGE_CONFIG = images.ImageConfig(size=16, random_flip=False, color_jitter=False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def write_pairs(directory, captions, num_shards=1):
    with formats.ImageTextWriter(str(directory), "pairs", num_shards) as writer:
        for i, caption in enumerate(captions):
            writer.write(solid_png(10 + 5 * i), caption, example_id=str(i))
    return str(directory / "pairs-*")


def pipeline_for(pattern, tok, batch_size=4, **kwargs):
    config = pairs.PairConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in ("max_len", "p_leading_space",
                                                                                   "num_frames", "fps")})
    kwargs.setdefault("image_config", IMAGE_CONFIG)
    return pairs.ImageTextPipeline(pattern, batch_size, tok, config=config, process_index=0, process_count=1,
                                   **kwargs)


def test_pair_layout_image_caption_eoc_eos(tmp_path, tok):
    captions = [f"a red cat sits on the left {i}." for i in range(6)]
    pattern = write_pairs(tmp_path, captions)
    batches = collect(pipeline_for(pattern, tok, 3, max_len=32, p_leading_space=0.0, training=False, num_epochs=1))
    assert len(batches) == 2
    for batch in batches:
        check_contract(batch, tok.vocab_size)
        assert batch["media"].shape == (3, 1, 1, 16, 16, 3) and occupied_slots(batch["media"]).all()
    for i, example in enumerate(rows(batches)):
        expected = [tok.bos_id, *tok.image_marker_ids, *tok.encode(captions[i]), tok.eoc_id, tok.eos_id]
        n = len(expected)
        np.testing.assert_array_equal(example["tokens"][:n], expected)
        assert (example["tokens"][n:] == tok.pad_id).all()
        assert tok.decode(example["tokens"][:n]) == "<image> " + captions[i] + "<EOC>"
        np.testing.assert_array_equal(example["media_index"], [-1] + [0] * (n - 1) + [-1] * (32 - n))
        np.testing.assert_array_equal(example["loss_mask"], [0] + [1] * (n - 2) + [0] * (32 - n + 1))
        assert red_value(example["media"][0], IMAGE_CONFIG) == 10 + 5 * i


def test_leading_space_with_probability_and_truncation(tmp_path, tok):
    caption = "a big dog runs to the right"
    assert tok.encode(" " + caption) != tok.encode(caption), "whitespace must survive tokenisation"
    pattern = write_pairs(tmp_path, [caption] * 8)
    seen = set()
    for example in rows(collect(pipeline_for(pattern, tok, 8, max_len=40, num_epochs=4, seed=1))):
        text = example["tokens"][2:][example["loss_mask"][1:-1] > 0][:-2]  # caption ids (before <EOC>, EOS)
        seen.add(tok.decode(text))
    assert seen == {caption, " " + caption}
    # No text augmentation outside training.
    for example in rows(collect(pipeline_for(pattern, tok, 8, max_len=40, p_leading_space=1.0, training=False,
                                             num_epochs=1))):
        assert tok.decode(example["tokens"][2:][example["loss_mask"][1:-1] > 0][:-2]) == caption
    # Too long: cut at L; the last target is padding, so it carries no loss.
    short = rows(collect(pipeline_for(pattern, tok, 8, max_len=6, p_leading_space=0.0, num_epochs=1)))[0]
    np.testing.assert_array_equal(short["tokens"], [tok.bos_id, *tok.image_marker_ids, *tok.encode(caption)[:4]])
    np.testing.assert_array_equal(short["loss_mask"], [0, 1, 1, 1, 1, 0])


def write_videos(directory, videos):
    with formats.VideoTextWriter(str(directory), "videos", 1) as writer:
        for num_frames, rate in videos:
            writer.write([solid_png(10 * k + 5) for k in range(num_frames)], rate, "a cat moves to the left.")
    return str(directory / "videos-*")


def frames_picked(example):
    return [(red_value(frame[None], IMAGE_CONFIG) - 5) // 10 for frame in example["media"][0]]


def test_video_frames_sampled_at_one_fps_from_stored_rate(tmp_path, tok):
    pattern = write_videos(tmp_path, [(20, 4.0), (20, 4.0), (3, 1.0), (12, 2.0)])
    config = pairs.PairConfig(max_len=16, num_frames=4, fps=1.0)
    common = dict(config=config, image_config=IMAGE_CONFIG, process_index=0, process_count=1)
    eval_batches = collect(pairs.VideoTextPipeline(pattern, 4, tok, training=False, num_epochs=1, **common))
    check_contract(eval_batches[0], tok.vocab_size)
    assert eval_batches[0]["media"].shape == (4, 1, 4, 16, 16, 3)
    picked = [frames_picked(e) for e in rows(eval_batches)]
    assert picked == [[0, 4, 8, 12], [0, 4, 8, 12], [0, 1, 2, 2], [0, 2, 4, 6]]
    starts = set()
    for example in rows(collect(pairs.VideoTextPipeline(pattern, 4, tok, num_epochs=5, seed=2, **common))):
        frames = frames_picked(example)
        step = np.diff(frames)
        assert (step == 4).all() or (step == 2).all() or frames == [0, 1, 2, 2]
        if (step == 4).all():
            assert 0 <= frames[0] <= 7  # the last sampled frame stays inside the 20 stored frames
            starts.add(frames[0])
    assert len(starts) > 1, "training starts at random offsets"


def test_images_keep_aspect_ratio_pad_with_mean_and_flip_only_in_training(tmp_path, tok):
    wide = np.zeros((8, 32, 3), np.uint8)
    wide[:, :16] = 250  # bright left half
    with formats.ImageTextWriter(str(tmp_path), "pairs", 1) as writer:
        for _ in range(12):
            writer.write(images.encode_image(wide, "PNG"), "a wide image")
    pattern = str(tmp_path / "pairs-*")
    evaluation = rows(collect(pipeline_for(pattern, tok, 4, training=False, num_epochs=1)))
    image = evaluation[0]["media"][0, 0]  # [16, 16, 3]: resized to 4 x 16, padded 6 rows above and below
    assert (image[:6] == 0).all() and (image[10:] == 0).all(), "padding must be the mean colour (0 after normalising)"
    expected_bright = (250 / 255 - np.asarray(images.CLIP_MEAN)) / np.asarray(images.CLIP_STD)
    np.testing.assert_allclose(image[6:10, 2], np.tile(expected_bright, (4, 1)), atol=0.02)
    np.testing.assert_allclose(image[6:10, 13], np.tile(-np.asarray(images.CLIP_MEAN) / images.CLIP_STD, (4, 1)),
                               atol=0.02)
    flip_config = images.ImageConfig(size=16, random_flip=True, color_jitter=False)
    flipped = [e["media"][0, 0, 8, 2, 0] < 0 for e in rows(collect(
        pipeline_for(pattern, tok, 4, image_config=flip_config, num_epochs=2, seed=5)))]
    assert any(flipped) and not all(flipped)
    assert not any(e["media"][0, 0, 8, 2, 0] < 0 for e in rows(collect(
        pipeline_for(pattern, tok, 4, image_config=flip_config, training=False, num_epochs=1))))


def test_schema_reads_the_same_with_tensorflow_and_python(tmp_path):
    from flamingo_jax.data._tf import tf

    record = formats.video_text_example([solid_png(1), solid_png(2)], 2.5, "a caption", example_id="v")
    with_tf = tf().io.parse_single_example(record, formats.feature_spec(formats.VIDEO_TEXT))
    with_python = formats.parse(record, formats.VIDEO_TEXT)
    assert set(with_tf) == set(with_python) == {"frames_encoded", "frame_rate", "caption"}
    for key, values in with_python.items():
        assert with_tf[key].numpy().tolist() == values
    t = tf()
    caption_as_int = t.train.Feature(int64_list=t.train.Int64List(value=[1]))
    wrong_type = t.train.Example(features=t.train.Features(feature={"caption": caption_as_int}))
    with pytest.raises(ValueError, match="needs a bytes_list"):
        formats.parse(wrong_type.SerializeToString(), formats.IMAGE_TEXT)
    with pytest.raises(ValueError, match="not a tf.train.Example"):
        formats.parse(b"\x00\x01 garbage", formats.IMAGE_TEXT)
