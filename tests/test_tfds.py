"""TFDS as a data source, on mocked `coco_captions` and `imagenet2012` (tests/tfds_mock.py):
the batches equal the TFRecord path's for the same examples, hosts read disjoint parts of a
split, SIGTERM + resume is exact, evaluate --source=tfds writes its table, and a missing
builder, split or data dir is named before anything compiles."""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import ml_collections
import numpy as np
import pytest
import tfds_mock

from flamingo_jax.core.config import ConfigError, RunConfig
from flamingo_jax.data import formats, synthetic, tfds_source
from flamingo_jax.data.errors import DataError, DataFileMissing
from flamingo_jax.data.mixture import Mixture
from flamingo_jax.evaluation import support as support_lib
from flamingo_jax.evaluation import tfds_readers
from flamingo_jax.training.trainer import Trainer

from helpers import ROOT, preempt_after, train_config

COCO = dict(image="image", text="captions/text")
SPLIT = "train[:90%]"  # 18 of the mocked 20 examples, one of them without a caption


@pytest.fixture(scope="module")
def tfds_root(tmp_path_factory):
    """The mocked builders' data dir; the mock is active for the whole module."""
    root = str(tmp_path_factory.mktemp("tfds"))
    with tfds_mock.mocked(root):
        yield root


def tfds_entry(root, **overrides):
    return dict(dict(name="coco", kind="tfds", batch_size=4, max_len=16, tfds_builder="coco_captions",
                     tfds_split=SPLIT, tfds_data_dir=root, tfds_fields=COCO), **overrides)


def data_config(corpus, root, **tfds_overrides):
    """The synthetic corpus' interleaved TFRecords + a TFDS pair source (32 px, as helpers.train_config)."""
    data = synthetic.data_config(corpus, image_size=32, interleaved_batch=4, pair_batch=4, video_batch=2,
                                 interleaved_len=32, pair_len=16, max_images=2, num_frames=2)
    data["datasets"] = [d for d in data["datasets"] if d["name"] == "interleaved"] + [
        tfds_entry(root, **tfds_overrides)]
    return data


def same_examples_as_tfrecords(source, out_dir):
    """The examples the TFDS source reads, written by our writer (one shard, in TFDS order),
    each with the caption the source chooses for it."""
    pattern = formats.shard_pattern(out_dir, "coco")
    with formats.ImageTextWriter(out_dir, "coco", 1) as writer:
        for index, example in enumerate(source.dataset().as_numpy_iterator()):
            caption = tfds_source.choose_text(example["captions"]["text"], source.training, source.seed, index)
            writer.write(example["image"], caption)
    return pattern


def test_tfds_batches_equal_the_tfrecord_path_and_resume_exactly(synthetic_corpus, tfds_root, tmp_path):
    config = data_config(synthetic_corpus, tfds_root)
    config["datasets"] = config["datasets"][1:]  # the pairs only (the trainer tests below mix in documents)
    from_tfds = Mixture.from_config(config, seed=3, process_index=0, process_count=1)
    assert from_tfds.specs["coco"].record_kind == "image_text"
    pattern = same_examples_as_tfrecords(from_tfds.pipelines["coco"].source, str(tmp_path))
    records = dict(config, datasets=[dict(name="coco", kind="image_text", pattern=pattern, batch_size=4,
                                          max_len=16)])
    from_records = Mixture.from_config(records, seed=3, process_index=0, process_count=1)
    batches = [next(from_tfds) for _ in range(10)]  # 40 pairs: over two epochs of 17 good examples
    for step, batch in enumerate(batches):
        expected = next(from_records)
        assert set(batch["coco"]) == set(expected["coco"])
        for field, value in expected["coco"].items():
            np.testing.assert_array_equal(batch["coco"][field], value, err_msg=f"step {step} {field}")
    assert batches[0]["coco"]["loss_mask"].sum() > 0 and (batches[0]["coco"]["media_index"] == 0).any()
    assert from_tfds.skip_counts()["coco"]["empty_text"] >= 2  # the caption-less example, once per epoch passed
    assert from_tfds.skip_counts() == from_records.skip_counts()
    captions = [tfds_source.choose_text(np.array([b"a", b"b", b"c"]), True, 0, i) for i in range(20)]
    assert len(set(captions)) == 3  # training draws among an example's captions ...
    assert tfds_source.choose_text(np.array([b"a", b"b"]), False, 0, 5) == "a"  # ... evaluation takes the first

    state = from_tfds.get_state()
    assert state["datasets"]["coco"]["tfds"] == f"coco_captions/{SPLIT}"
    again = Mixture.from_config(config, seed=3, process_index=0, process_count=1)
    for _ in range(4):
        next(again)
    resumed = Mixture.from_config(config, seed=3, process_index=0, process_count=1)
    resumed.set_state(json.dumps(again.get_state()))  # as a checkpoint holds it
    for step in range(4, 10):
        batch = next(resumed)["coco"]
        for field, value in batches[step]["coco"].items():
            np.testing.assert_array_equal(batch[field], value, err_msg=f"resumed step {step} {field}")
    assert resumed.skip_counts() == from_tfds.skip_counts()
    other_split = Mixture.from_config(dict(config, datasets=[tfds_entry(tfds_root, tfds_split="train[:50%]")]),
                                      seed=3, process_index=0, process_count=1)
    with pytest.raises(DataError, match="saved iterator state has tfds='coco_captions/train"):
        other_split.set_state(state)  # a position in another split means nothing
    for mixture in (from_tfds, from_records, resumed, again, other_split):
        mixture.close()


def test_two_hosts_read_disjoint_equal_parts_of_the_split(synthetic_corpus, tfds_root):
    seen = []
    for host in range(2):
        mixture = Mixture.from_config(data_config(synthetic_corpus, tfds_root), seed=0, process_index=host,
                                      process_count=2)
        source = mixture.pipelines["coco"].source
        ids = [int(e["image/id"]) for e in source.dataset().as_numpy_iterator()]
        assert source.num_examples == len(ids) == 9
        assert mixture.get_state()["datasets"]["coco"]["process_index"] == host
        seen.append(set(ids))
        mixture.close()
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(18))  # together: all of train[:90%]
    only_tfds = dict(data_config(synthetic_corpus, tfds_root), datasets=[tfds_entry(tfds_root, tfds_split="train[:5]")])
    with pytest.raises(DataError, match="too few examples for 32"):
        Mixture.from_config(only_tfds, seed=0, process_index=0, process_count=32)


@pytest.mark.parametrize("overrides, error, named", [
    (dict(tfds_builder="coco_captionz"), DataError, ("tfds_builder='coco_captionz' is not a TFDS builder",
                                                     "Did you mean 'coco_captions'")),
    (dict(tfds_split="validation"), DataError, "tfds_split='validation' is not a split of 'coco_captions'"),
    (dict(tfds_data_dir="/no/such/tfds"), DataFileMissing, "tfds_data_dir='/no/such/tfds' does not exist"),
    (dict(tfds_builder="mnist"), DataFileMissing, "TFDS builder 'mnist' is not prepared in"),
    (dict(tfds_fields=dict(image="picture", text="captions/text")), DataError, "names feature 'picture'"),
])
def test_a_missing_builder_split_or_data_dir_is_named_before_compiling(synthetic_corpus, tfds_root, tmp_path,
                                                                        monkeypatch, overrides, error, named):
    config = train_config(synthetic_corpus, datasets=("interleaved",))
    config.data = ml_collections.ConfigDict(data_config(synthetic_corpus, tfds_root, **overrides))

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before the data was checked")

    monkeypatch.setattr(jax, "jit", no_compiling)
    with pytest.raises(error) as caught:
        Trainer(config, str(tmp_path / "run"))
    for part in (named,) if isinstance(named, str) else named:
        assert part in str(caught.value)


@pytest.mark.parametrize("overrides, named", [
    (dict(tfds_fields=dict(image="image")), "tfds_fields needs `text`"),
    (dict(tfds_fields=dict(image="image", frames="video", text="t")), "exactly one of `image`"),
    (dict(pattern="/data/*.tfrecord"), "drop `pattern`"),
    (dict(tfds_builder=None), "missing required field 'tfds_builder'"),
])
def test_the_typed_config_checks_a_tfds_entry(overrides, named):
    entry = {k: v for k, v in tfds_entry("/tfds", **overrides).items() if v is not None}
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        RunConfig.from_config(dict(data=dict(tokenizer="", image_size=32, datasets=[entry])))


@pytest.fixture(scope="module")
def straight(synthetic_corpus, tfds_root, tmp_path_factory):
    """A mixture of TFRecord documents and TFDS pairs, trained 4 steps without interruption."""
    config = train_config(synthetic_corpus, datasets=("interleaved",), steps=4)
    config.data = ml_collections.ConfigDict(data_config(synthetic_corpus, tfds_root))
    workdir = str(tmp_path_factory.mktemp("straight"))
    trainer = Trainer(config, workdir)
    result = trainer.run()
    params = jax.tree.map(np.asarray, trainer.last_state.params)
    trainer.close()
    return config, workdir, result, params


def test_a_tfds_mixture_trains_and_resumes_exactly_after_sigterm(straight, tmp_path):
    config, _, uninterrupted, params = straight
    assert sorted(uninterrupted.losses) == [1, 2, 3, 4]
    assert all(np.isfinite(loss) for loss in uninterrupted.losses.values())

    first = Trainer(config, str(tmp_path / "resumed"))
    stopped = first.run(after_step=preempt_after(2))
    first.close()
    assert stopped.preempted and stopped.step == 2
    second = Trainer(config, str(tmp_path / "resumed"))
    resumed = second.run()
    resumed_params = jax.tree.map(np.asarray, second.last_state.params)
    second.close()
    assert sorted(resumed.losses) == [3, 4]
    for step in range(1, 5):
        losses = stopped.losses if step <= 2 else resumed.losses
        np.testing.assert_allclose(losses[step], uninterrupted.losses[step], rtol=1e-6)
    chex.assert_trees_all_close(resumed_params, params, rtol=1e-6, atol=1e-7)


def test_training_on_tfds_equals_training_on_the_same_examples_as_tfrecords(straight, tmp_path):
    config, _, from_tfds, _ = straight
    data = config.data.to_dict()
    mixture = Mixture.from_config(data, seed=config.seed, process_index=0, process_count=1)  # as the trainer's
    pattern = same_examples_as_tfrecords(mixture.pipelines["coco"].source, str(tmp_path))
    mixture.close()
    data["datasets"] = [data["datasets"][0], dict(name="coco", kind="image_text", pattern=pattern, batch_size=4,
                                                  max_len=16)]
    records = ml_collections.ConfigDict(config.to_dict())
    records.data = ml_collections.ConfigDict(data)
    trainer = Trainer(records, str(tmp_path / "run"))
    from_records = trainer.run()
    trainer.close()
    for step, loss in from_tfds.losses.items():
        np.testing.assert_allclose(from_records.losses[step], loss, rtol=1e-6, err_msg=f"step {step}")


def test_evaluate_reads_coco_and_imagenet_from_tfds(straight, tfds_root):
    _, workdir, _, _ = straight
    tfds_mock.write_synset_mapping(tfds_root)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, str(ROOT / "tests" / "tfds_mock.py"), tfds_root, "-m", "flamingo_jax.evaluate",
               f"--workdir={workdir}", "--tasks=coco,imagenet", "--source=tfds", f"--tfds_data_dir={tfds_root}",
               "--shots=0", "--num_queries=3", "--support_size=4", "--batch_size=4", "--ensemble=1", "--num_beams=2"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = (pathlib.Path(workdir) / "eval").glob("step_4.coco-tfds+imagenet-tfds.*.json")
    results = json.loads(json_path.read_text())
    assert results["meta"]["sources"] == {"coco": "tfds", "imagenet": "tfds"}
    for task, metric in (("coco", "cider"), ("imagenet", "top1_accuracy")):
        entry = results["results"][task]["0"]
        assert entry["num_queries"] == 3 and (np.isnan(entry[metric]) or 0 <= entry[metric] <= 100)
    table = json_path.with_suffix(".md").read_text()
    assert "| coco | cider |" in table and "| imagenet | top1_accuracy |" in table



def test_tfds_task_sources_and_their_errors(tfds_root, tmp_path):
    assert tfds_readers.parse_sources("tfds", ["coco", "vqav2"]) == {"coco": "tfds", "vqav2": "tfds"}
    assert tfds_readers.parse_sources("coco=tfds", ["coco", "vqav2"]) == {"coco": "tfds", "vqav2": "files"}
    with pytest.raises(tfds_readers.TfdsTaskError, match="'okvqa=tfds'"):
        tfds_readers.parse_sources("okvqa=tfds", ["coco"])
    with pytest.raises(tfds_readers.TfdsTaskError, match="task 'vqav2' has no TFDS source"):
        tfds_readers.tfds_loader("vqav2", tfds_root, tmp_path, support_size=4, num_queries=None, seed=0)
    support, queries = tfds_readers.tfds_loader("coco", tfds_root, tmp_path, support_size=5, num_queries=4,
                                                seed=0)(None)
    assert len(support) == 5 and all(e.captions for e in support)  # the caption-less example is left out
    expected = support_lib.sample_queries(list(range(6)), 4, 1)  # the evaluator's own choice of 4 of 6 queries
    assert [e.id - 1000 for e in queries] == expected
    assert queries[0].image_path.read_bytes()[:2] == b"\xff\xd8"  # the JPEG bytes as TFDS stores them
    empty = tmp_path / "no_mapping"
    empty.mkdir()
    with pytest.raises(tfds_readers.TfdsTaskError, match="LOC_synset_mapping.txt"):
        tfds_readers.tfds_loader("imagenet", str(empty), tmp_path, support_size=2, num_queries=None, seed=0)(None)
