"""A converted decoder trains in a Flamingo run: `config.backbones.decoder` names it, the Trainer
restores it as the frozen LM and steps; the frozen weights stay the converted ones."""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("USE_TF", "0")  # transformers would otherwise import TensorFlow for its TF models
import torch
import torchvision_cpu  # noqa: F401  (before transformers imports torchvision)

from flamingo_jax import cli as flamingo_cli
from flamingo_jax.convert import cli, writer
from flamingo_jax.training.trainer import Trainer

from helpers import train_config


def test_a_converted_llama_trains_as_the_frozen_lm(synthetic_corpus, tmp_path, caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    from flamingo_jax.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(os.path.join(synthetic_corpus, "spm.model")).vocab_size
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    model.save_pretrained(tmp_path / "llama")
    out = str(tmp_path / "converted")
    tokenizer = os.path.join(synthetic_corpus, "spm.model")
    assert flamingo_cli.guard(lambda: cli.main(["convert", "decoder", f"--from={tmp_path / 'llama'}", f"--out={out}",
                                                f"--tokenizer={tokenizer}"])) == 0
    config = train_config(synthetic_corpus, steps=2)
    for path, value in writer.read_record(out)["model"]["decoder"].items():  # what the printed flags set
        node = config.model.decoder
        *parents, leaf = path.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    config.model.xattn.every = 2
    config.backbones.decoder = out
    with caplog.at_level("INFO"):
        trainer = Trainer(config, str(tmp_path / "run"))
        try:
            result = trainer.run()
        finally:
            trainer.close()
    assert f"restored frozen decoder from {out}" in caplog.text
    assert "NO PRETRAINED WEIGHTS for vision" in caplog.text  # only the encoder is random here
    assert sorted(result.losses) == [1, 2] and all(np.isfinite(loss) for loss in result.losses.values())
