"""Acceptance, at small size: the pretrained backbones checked on their own. The contrastive vision
encoder retrieves the right caption among 100 held-out pairs (recall@1 >= 30%, chance 1%); the
pretrained LM's held-out perplexity is at most a tenth of its random initialisation's."""

import logging

import jax
import numpy as np
import pytest
from conftest import once_per_session
from test_pretraining import TINY_TEXT_ENCODER

from flamingo_jax.evaluation import backbone_checks
from flamingo_jax.training.trainer import Trainer

from helpers import train_config


@pytest.fixture(scope="session")
def pretraining_corpus(session_dir):
    """More pairs than the session corpus (1500), so a contrastive encoder can generalise; 100
    validation pairs and documents (13 s to write on 2 busy cores)."""
    from flamingo_jax.data import synthetic

    def build(out):
        synthetic.generate(str(out), num_examples=1500, num_documents=300, num_videos=4, num_eval=4,
                           num_validation=100, image_size=32, vocab_size=512, num_shards=1, seed=0)

    return str(once_per_session(session_dir, "pretraining_corpus", build))


def pretrain(corpus, workdir, objective, datasets, steps, batch_size):
    config = train_config(corpus, datasets=datasets, steps=steps)
    config.objective = objective
    config.contrastive.text.update(**TINY_TEXT_ENCODER)
    config.synthetic.out_dir = corpus  # where the checks find the validation split
    config.train.update(learning_rate=3e-3, schedule="constant", log_every=50)
    config.checkpoint.async_save = False
    for dataset in config.data.datasets:
        dataset.update(batch_size=batch_size, max_len=32)
    trainer = Trainer(config, str(workdir))
    try:
        trainer.run()
    finally:
        trainer.close()
    return backbone_checks.load_pretraining_run(str(workdir))


def test_the_pretrained_vision_encoder_retrieves_held_out_captions(pretraining_corpus, tmp_path):
    run = pretrain(pretraining_corpus, tmp_path, "contrastive", ("image_text",), steps=300, batch_size=64)
    recall = backbone_checks.retrieval_recall(run)
    assert recall["num_pairs"] == 100 and recall["chance_at_1"] == 1.0
    assert recall["recall_at_1"] >= 30.0 and recall["recall_at_1"] >= 10 * recall["chance_at_1"], recall
    assert recall["recall_at_5"] >= recall["recall_at_1"]
    with pytest.raises(TypeError, match="needs an LM run"):
        backbone_checks.perplexity(run)


def test_the_pretrained_language_model_is_ten_times_less_perplexed_than_at_random_init(pretraining_corpus,
                                                                                       tmp_path, caplog):
    run = pretrain(pretraining_corpus, tmp_path, "lm", ("interleaved", "image_text"), steps=80, batch_size=8)
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        result = backbone_checks.perplexity(run)
    # The trained and the random weights share the loss: one compile per batch shape (documents, captions).
    assert sum(record.getMessage().startswith("Compiling jit(<lambda>)") for record in caplog.records) == 2
    assert result["num_tokens"] > 1000
    assert result["perplexity"] <= result["random_init_perplexity"] / 10, result


def test_recall_counts_a_caption_equal_to_the_images_own_as_found():
    captions = [("a", "red", "circle"), ("a", "blue", "star"), ("a", "red", "circle"), ("two", "stars")]
    similarity = np.array([[0.9, 0.1, 0.0, 0.0],   # its own caption first: found
                           [0.8, 0.2, 0.0, 0.1],   # another caption first, its own second
                           [0.9, 0.0, 0.1, 0.0],   # pair 0's text first, but the same words: found
                           [0.0, 0.0, 0.0, 0.1]])  # its own first
    recall = backbone_checks.image_to_text_recall(similarity, captions)
    assert recall == {"recall_at_1": 75.0, "recall_at_5": 100.0, "num_pairs": 4, "chance_at_1": 25.0}
    assert backbone_checks.image_to_text_recall(similarity[:, [1, 0, 2, 3]], captions)["recall_at_1"] == 50.0
