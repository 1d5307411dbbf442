"""`python -m flamingo_jax.convert decoder`: Hugging Face causal LMs -> our frozen decoder, with parity.

Each family's reference model is built in transformers with random weights
(every parameter perturbed, so no norm is the identity and no bias is 0) and a
tiny config, saved with `save_pretrained` (safetensors), converted with the
CLI, restored through core/backbones.py into our decoder, and run on the same
left-padded batch: HF with its attention_mask (and the position ids generation
uses), ours with the same positions and `valid` keys. Logits at real tokens
must agree within 1e-4 (fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("USE_TF", "0")  # transformers would otherwise import TensorFlow for its TF models
import jax
import jax.numpy as jnp
import torch
import torchvision_cpu  # noqa: E402, F401  (before transformers imports torchvision)
from flax import nnx

from flamingo_jax import cli as flamingo_cli
from flamingo_jax.convert import cli, writer
from flamingo_jax.core import backbones
from flamingo_jax.models.config import DecoderConfig, build_config
from flamingo_jax.models.decoder import Decoder

TOLERANCE = 1e-4  # max abs, fp32
VOCAB = 128
OBSERVED: dict[str, float] = {}  # family -> max abs error, printed by the parity tests (-s)


def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def convert(*flags: str) -> int:
    """`python -m flamingo_jax.convert decoder ...` in-process: its exit status."""
    try:
        return flamingo_cli.guard(lambda: cli.main(["flamingo_jax.convert", "decoder", *flags]))
    except SystemExit as exit:
        return exit.code


def assert_nothing_written(out: str) -> None:
    parent, name = os.path.split(out)
    assert not os.path.lexists(out)
    assert not [entry for entry in os.listdir(parent) if entry.startswith(f".{name}.converting-")]


def decoder_config(record: dict) -> DecoderConfig:
    """Our DecoderConfig from the record's dotted `model.decoder` fields."""
    nested: dict = {}
    for path, value in record["model"]["decoder"].items():
        *parents, leaf = path.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return build_config(DecoderConfig, nested, "model.decoder")


def restored_decoder(out: str) -> Decoder:
    cfg = decoder_config(writer.read_record(out))
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    nnx.replace_by_pure_dict(state, backbones.restore(out, pure, jax.tree.map(lambda _: device, pure)))
    return nnx.merge(graphdef, state)


def padded_batch(seed: int = 0, length: int = 9, pad: int = 3):
    """Tokens [2, T] (row 1 left-padded by `pad`), its mask and positions (0 at each row's first token)."""
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (2, length))
    mask = np.ones((2, length), bool)
    mask[1, :pad] = False
    tokens[1, :pad] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


def ours(out: str, tokens, mask, positions) -> np.ndarray:
    decoder = restored_decoder(out)
    run = nnx.jit(lambda m, t, p, v: m(t, p, v))
    return np.asarray(run(decoder, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                          jnp.asarray(mask)))


def reference(model, tokens, mask, positions, *, position_ids: bool = True) -> np.ndarray:
    kwargs = dict(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64)))
    if position_ids:
        kwargs["position_ids"] = torch.from_numpy(positions)
    with torch.no_grad():
        return model(**kwargs).logits.numpy()


def saved(model, root) -> str:
    model.save_pretrained(root / "src", safe_serialization=True)
    return str(root / "src")


# ---------------------------------------------------------------- reference models (one per family)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """LLaMA with grouped-query attention (4 heads, 2 KV), Llama 3 rope scaling, untied embeddings;
    saved as sharded safetensors (an index), converted in-process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8))
    model = randomise_(LlamaForCausalLM(config), seed=1)
    root = tmp_path_factory.mktemp("llama")
    model.save_pretrained(root / "src", max_shard_size="40KB")
    assert (root / "src" / "model.safetensors.index.json").exists()
    out = str(root / "converted")
    assert convert(f"--from={root / 'src'}", f"--out={out}", "--buffer_mb=0") == 0
    return model, root, out


@pytest.fixture(scope="module")
def gpt_neox(tmp_path_factory):
    """GPT-NeoX: fused per-head QKV, rotary on a quarter of each head, parallel residual, biases."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, rotary_pct=0.25, max_position_embeddings=64,
                           use_parallel_residual=True, tie_word_embeddings=False)
    model = randomise_(GPTNeoXForCausalLM(config), seed=2)
    root = tmp_path_factory.mktemp("gpt_neox")
    out = str(root / "converted")
    assert convert(f"--from={saved(model, root)}", f"--out={out}") == 0
    return model, root, out


@pytest.fixture(scope="module")
def mpt(tmp_path_factory):
    """MPT: ALiBi with 6 heads (not a power of two: MPT's interleaved slopes), no biases, tied."""
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    config = MptConfig(vocab_size=VOCAB, d_model=48, n_heads=6, n_layers=2, max_seq_len=64, no_bias=True,
                       attn_config=dict(alibi_bias_max=8))
    model = randomise_(MptForCausalLM(config), seed=3)
    root = tmp_path_factory.mktemp("mpt")
    # The converter is run as a user runs it: a subprocess of `python -m flamingo_jax.convert`.
    out = str(root / "converted")
    result = subprocess.run([sys.executable, "-m", "flamingo_jax.convert", "decoder", f"--from={saved(model, root)}",
                             f"--out={out}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--config.model.decoder.positions=alibi" in result.stdout
    return model, root, out


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "mpt"])
def test_logits_match_the_reference_over_a_padded_batch(family, request):
    model, _, out = request.getfixturevalue(family)
    tokens, mask, positions = padded_batch(seed=len(family))
    want = reference(model, tokens, mask, positions, position_ids=family != "mpt")
    got = ours(out, tokens, mask, positions)
    assert got.shape == want.shape == (2, tokens.shape[1], VOCAB)
    error = float(np.abs(got - want)[mask].max())
    OBSERVED[family] = error
    print(f"\n{family}: max abs logit error {error:.2e}")
    assert error <= TOLERANCE, error
    assert np.abs(want[mask]).max() > 0.1  # the comparison is not between near-zero logits


def test_record_describes_the_llama_family_choices(llama):
    _, _, out = llama
    record = writer.read_record(out)
    fields = record["model"]["decoder"]
    assert (fields["num_heads"], fields["num_kv_heads"], fields["head_dim"]) == (4, 2, 16)
    assert (fields["rope_scaling.kind"], fields["rope_scaling.original_max_len"]) == ("llama3", 8)
    assert fields["tie_embeddings"] is False and fields["ffw"] == "swiglu"
    assert f"--config.backbones.decoder={out}" in record["overrides"]
    assert "--config.model.decoder.rope_scaling.factor=8.0" in record["overrides"]
