"""A TFDS video builder prepared for real (a tiny one defined here, no download, no mock):
video-text batches equal the TFRecord path's for the same examples, through TFDS's own
reader, split slicing and per-host split."""

import numpy as np
import pytest

from flamingo_jax.data import formats, synthetic, tfds_source
from flamingo_jax.data.mixture import Mixture

tfds = tfds_source.tfds()


class TinyVideoCaptions(tfds.core.GeneratorBasedBuilder):
    """Six clips of 3..8 frames at 2 frames per second, one caption each (registered by name)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "video": tfds.features.Video(shape=(None, 16, 20, 3)), "caption": tfds.features.Text(),
            "fps": np.float32}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(6)}

    def _generate_examples(self, count):
        for i in range(count):
            frames = np.random.default_rng(i).integers(0, 255, [3 + i, 16, 20, 3], dtype=np.uint8)
            yield i, {"video": frames, "caption": "" if i == 2 else f"a blue square number {i}", "fps": 2.0}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds_video"))
    tfds.builder("tiny_video_captions", data_dir=data_dir).download_and_prepare()
    return data_dir


def test_video_batches_from_a_prepared_builder_equal_the_tfrecord_path(synthetic_corpus, prepared, tmp_path):
    data = synthetic.data_config(synthetic_corpus, image_size=32, interleaved_batch=2, pair_batch=2, video_batch=2,
                                 interleaved_len=32, pair_len=16, max_images=2, num_frames=2)
    video = dict(name="clips", batch_size=2, max_len=16, num_frames=3, fps=1.0)
    entry = dict(video, kind="tfds", tfds_builder="tiny_video_captions", tfds_split="train",
                 tfds_data_dir=prepared, tfds_fields=dict(frames="video", text="caption", frame_rate="fps"))
    from_tfds = Mixture.from_config(dict(data, datasets=[entry]), seed=1, process_index=0, process_count=1)
    assert from_tfds.specs["clips"].record_kind == "video_text"
    source = from_tfds.pipelines["clips"].source
    with formats.VideoTextWriter(str(tmp_path), "clips", 1) as writer:
        for example in source.dataset().as_numpy_iterator():
            writer.write(list(example["video"]), float(example["fps"]), example["caption"].decode())
    records = dict(video, kind="video_text", pattern=formats.shard_pattern(str(tmp_path), "clips"))
    from_records = Mixture.from_config(dict(data, datasets=[records]), seed=1, process_index=0, process_count=1)
    for step in range(6):  # 5 good clips of 6 per epoch: over two epochs
        batch, expected = next(from_tfds)["clips"], next(from_records)["clips"]
        assert batch["media"].shape == (2, 1, 3, 32, 32, 3)
        for field, value in expected.items():
            np.testing.assert_array_equal(batch[field], value, err_msg=f"step {step} {field}")
    assert from_tfds.skip_counts() == from_records.skip_counts()
    assert from_tfds.skip_counts()["clips"]["empty_text"] >= 1  # the clip without a caption

    parts = []  # TFDS's own split_for_jax_process over prepared files: disjoint, equal, complete
    for host in range(2):
        mixture = Mixture.from_config(dict(data, datasets=[dict(entry, tfds_split="train")]), seed=1,
                                      process_index=host, process_count=2)
        parts.append({ex["caption"] for ex in mixture.pipelines["clips"].source.dataset().as_numpy_iterator()})
        mixture.close()
    assert len(parts[0]) == len(parts[1]) == 3 and not parts[0] & parts[1]
    sliced = Mixture.from_config(dict(data, datasets=[dict(entry, tfds_split="train[:50%]")]), seed=1,
                                 process_index=0, process_count=1)
    assert sliced.pipelines["clips"].source.num_examples == 3
    sliced.close()
    for mixture in (from_tfds, from_records):
        mixture.close()
