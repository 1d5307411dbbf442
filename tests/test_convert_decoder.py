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
import sys

import numpy as np
import pytest

os.environ.setdefault("USE_TF", "0")  # transformers would otherwise import TensorFlow for its TF models
import jax
import jax.numpy as jnp
import torch
import torchvision_cpu  # noqa: F401 - lets transformers import torchvision on CPU torch
from flax import nnx

from flamingo_jax.convert import writer
from flamingo_jax.core import backbones
from flamingo_jax.models.config import DecoderConfig, build_config
from flamingo_jax.models.decoder import Decoder

from helpers import assert_nothing_written, run_convert

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
    return run_convert("decoder", *flags)


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
def mpt(tmp_path_factory, run_cli):
    """MPT: ALiBi with 6 heads (not a power of two: MPT's interleaved slopes), no biases, tied."""
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    config = MptConfig(vocab_size=VOCAB, d_model=48, n_heads=6, n_layers=2, max_seq_len=64, no_bias=True)
    model = randomise_(MptForCausalLM(config), seed=3)
    root = tmp_path_factory.mktemp("mpt")
    # The converter is run as a user runs it: `python -m flamingo_jax.convert` (forked from the zygote).
    out = str(root / "converted")
    result = run_cli("flamingo_jax.convert", "decoder", f"--from={saved(model, root)}", f"--out={out}", timeout=300)
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


def variant(family: str):
    """The other side of each family's switches: GPT-NeoX sequential with tied embeddings and
    tanh GELU; MPT with 4 heads (a power of two: ALiBi's plain slopes)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, MptConfig, MptForCausalLM

    torch.manual_seed(0)
    if family == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            rotary_pct=0.5, use_parallel_residual=False, tie_word_embeddings=True, hidden_act="gelu_new"))
    return MptForCausalLM(MptConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=1))


@pytest.mark.parametrize("family", ["gpt_neox", "mpt"])
def test_family_variants_match_the_reference_from_a_torch_bin(family, tmp_path):
    """Saved as pytorch_model.bin (read with torch.load(weights_only=True)), converted, equal logits."""
    model = randomise_(variant(family), seed=5)
    model.save_pretrained(tmp_path / "src", safe_serialization=False)
    assert (tmp_path / "src" / "pytorch_model.bin").exists()
    out = str(tmp_path / "converted")
    assert convert(f"--from={tmp_path / 'src'}", f"--out={out}") == 0
    tokens, mask, positions = padded_batch(seed=11, length=6, pad=2)
    want = reference(model, tokens, mask, positions, position_ids=family != "mpt")
    error = float(np.abs(ours(out, tokens, mask, positions) - want)[mask].max())
    print(f"\n{family} variant: max abs logit error {error:.2e}")
    assert error <= TOLERANCE, error


def test_record_describes_the_llama_family_choices(llama):
    _, _, out = llama
    record = writer.read_record(out)
    fields = record["model"]["decoder"]
    assert (fields["num_heads"], fields["num_kv_heads"], fields["head_dim"]) == (4, 2, 16)
    assert (fields["rope_scaling.kind"], fields["rope_scaling.original_max_len"]) == ("llama3", 8)
    assert fields["tie_embeddings"] is False and fields["ffw"] == "swiglu"
    assert f"--config.backbones.decoder={out}" in record["overrides"]
    assert "--config.model.decoder.rope_scaling.factor=8.0" in record["overrides"]


# ---------------------------------------------------------------- the converted decoder inside Flamingo


def parse_config(overrides: list[str], monkeypatch):
    """configs/tiny.py with `overrides` parsed as the training CLI parses them."""
    from absl import flags
    from ml_collections import config_flags

    from helpers import ROOT

    argv = ["train", f"--config={ROOT / 'configs' / 'tiny.py'}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    values(argv)
    return values.config


def test_flamingo_at_step_0_gives_the_converted_decoders_logits(llama, monkeypatch):
    """configs/tiny.py with the printed overrides (and two new tokens, as an HF tokenizer adds) builds
    the converted decoder; `config.backbones.decoder` restores it into Flamingo's frozen weights
    (a small random ViT stands in for the vision encoder). With every tanh gate at 0, Flamingo's logits over the frozen
    vocabulary are the bare decoder's, on the same padded batch and with an image attached."""
    from flamingo_jax.core import sharding
    from flamingo_jax.core.parts import ModelParts
    from flamingo_jax.models.config import FlamingoConfig

    _, _, out = llama
    small_vision = ["--config.model.vision.encoder=vit", "--config.model.vision.image_size=32",
                    "--config.model.vision.num_frames=1", "--config.model.vision.vit.width=32",
                    "--config.model.vision.vit.num_layers=1", "--config.model.vision.vit.num_heads=2",
                    "--config.model.vision.vit.patch_size=16"]  # few compiles: any encoder will do
    config = parse_config(writer.read_record(out)["overrides"] + ["--config.model.num_new_tokens=2"] + small_vision,
                          monkeypatch)
    cfg = FlamingoConfig.from_dict(config.model)
    parts = ModelParts.flamingo(cfg)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    _, frozen_shardings = sharding.weight_shardings(parts, mesh, sharding.rules_from_config(config.get("mesh_rules")))
    _, abstract_frozen = parts.abstract()
    params, frozen = parts.init(seed=0)
    paths = backbones.check_paths(config.backbones)
    assert paths == {"decoder": out}
    model = parts.merge(params, backbones.load_into(frozen, abstract_frozen, frozen_shardings, paths))
    gates = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model.xattn)))
             if "gate" in jax.tree_util.keystr(path)]
    assert gates and all(np.all(np.asarray(g) == 0) for g in gates)

    tokens, mask, positions = padded_batch(seed=7)
    tokens = tokens.copy()
    tokens[:, -1] = [cfg.eoc_id, cfg.eoc_id + 1]  # <EOC> and <image>: the two trainable rows
    media = np.random.default_rng(0).standard_normal((2, 1, 1, 32, 32, 3)).astype(np.float32)
    args = [jnp.asarray(a) for a in (tokens, media, np.zeros_like(tokens), positions, mask)]
    flamingo = np.asarray(nnx.jit(lambda m, t, x, i, p, v: m(t, x, i, p, v))(model, *args))
    assert flamingo.shape == (2, tokens.shape[1], VOCAB + 2)
    bare = ours(out, np.where(tokens >= VOCAB, 0, tokens), mask, positions)
    np.testing.assert_array_equal(flamingo[:, :-1, :VOCAB][mask[:, :-1]], bare[:, :-1][mask[:, :-1]])
    new_rows = np.asarray(model.embed(jnp.asarray([[VOCAB, VOCAB + 1]])))[0]
    np.testing.assert_array_equal(new_rows, np.asarray(model.new_token_embedding[...]))


# ---------------------------------------------------------------- tokenizers


def byte_bpe_tokenizer(directory) -> str:
    """A small byte-level BPE tokenizer.json (GPT-2 / Llama-3 style), trained in the test."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tokenizer.train_from_iterator(["a photo of a cat", "two dogs playing in the snow", "a red car"] * 20, trainer)
    path = os.path.join(directory, "tokenizer.json")
    tokenizer.save(path)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, f)
    return path


def word_tokenizer(directory, size: int) -> str:
    """A word-level tokenizer.json with exactly `size` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = os.path.join(directory, f"words{size}.json")
    tokenizer.save(path)
    return path


def test_hf_tokenizer_adds_eoc_and_image_as_the_reference_does(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from flamingo_jax.data.tokenizer import HFTokenizer, load_tokenizer

    path = byte_bpe_tokenizer(tmp_path)
    ours_tok = load_tokenizer(path)
    assert isinstance(ours_tok, HFTokenizer)
    reference_tok = PreTrainedTokenizerFast(tokenizer_file=path)
    vocab = len(reference_tok)
    reference_tok.add_special_tokens({"additional_special_tokens": ["<EOC>", "<image>"]})  # OpenFlamingo's order
    assert (ours_tok.vocab_size, ours_tok.eoc_id, ours_tok.image_marker_ids) == (vocab, vocab, (vocab + 1,))
    assert ours_tok.eoc_id == reference_tok.convert_tokens_to_ids("<EOC>")
    assert ours_tok.num_new_tokens == 2 and ours_tok.total_vocab_size == len(reference_tok)
    assert ours_tok.bos_id == ours_tok.eos_id == reference_tok.convert_tokens_to_ids("<|endoftext|>")
    text = "<image>A photo of a cat.<EOC><image> Two dogs in the snow<EOC>"
    ids = ours_tok.encode_with_markers(text)
    assert ids == reference_tok.encode(text, add_special_tokens=False)
    assert ids.count(ours_tok.eoc_id) == 2 and ids.count(vocab + 1) == 2
    assert ours_tok.decode(ids) == text
    # Plain text never forges the new tokens: a literal marker stays text.
    plain = ours_tok.encode("see <image> and <EOC>")
    assert max(plain) < vocab and "image" in ours_tok.decode(plain)


def test_hf_tokenizer_documents_put_the_new_ids_where_the_pipelines_expect(tmp_path):
    """An interleaved document tokenized with a tokenizer.json: BOS, <image> (id V+1) as its one
    marker id, <EOC> (id V) before every later image and at the end, EOS; text ids below V."""
    from flamingo_jax.data import sequence
    from flamingo_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(byte_bpe_tokenizer(tmp_path))
    v = tokenizer.vocab_size
    document = sequence.tokenize_document([None, "a photo of a cat", None, "a red car"], tokenizer)
    ids, roles = document.ids.tolist(), document.roles.tolist()
    assert ids[0] == tokenizer.bos_id and ids[1] == v + 1 and ids[-2:] == [v, tokenizer.eos_id]
    assert [i for i, r in zip(ids, roles) if r == sequence.MARKER] == [v + 1, v + 1]
    assert [i for i, r in zip(ids, roles) if r == sequence.EOC] == [v, v]
    assert all(i < v for i, r in zip(ids, roles) if r == sequence.TEXT)


def test_converter_checks_the_tokenizer_and_names_it_in_the_flags(llama, tmp_path):
    _, root, _ = llama
    tokenizer = word_tokenizer(tmp_path, VOCAB)
    out = str(tmp_path / "converted")
    assert convert(f"--from={root / 'src'}", f"--out={out}", f"--tokenizer={tokenizer}") == 0
    record = writer.read_record(out)
    assert "--config.model.num_new_tokens=2" in record["overrides"]
    assert f"--config.data.tokenizer={tokenizer}" in record["overrides"]
    assert record["tokenizer"]["eoc_id"] == VOCAB and record["tokenizer"]["image_marker_ids"] == [VOCAB + 1]


# ---------------------------------------------------------------- bad input: a clear error, nothing written


def llama_variant(llama, tmp_path, edit=lambda tensors: None, edit_config=lambda config: None) -> str:
    """The LLaMA reference saved again as one safetensors file after `edit(tensors)` / `edit_config(config)`."""
    from safetensors.torch import save_file

    model, _, _ = llama
    tensors = {name: tensor.clone().contiguous() for name, tensor in model.state_dict().items()}
    edit(tensors)
    config = model.config.to_dict()
    edit_config(config)
    os.makedirs(tmp_path / "src")
    with open(tmp_path / "src" / "config.json", "w") as f:
        json.dump(config, f)
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    return str(tmp_path / "src")


LAYER_1 = "model.layers.1"
BAD_TENSORS = {
    "missing": (lambda t: t.pop(f"{LAYER_1}.mlp.up_proj.weight"),
                ["missing tensors (1)", f"{LAYER_1}.mlp.up_proj.weight", "layers/ffw/wg/kernel (layer 1 of 2)"]),
    "extra": (lambda t: t.update({f"{LAYER_1}.self_attn.q_norm.weight": torch.ones(16)}),
              ["unexpected tensors (1)", f"{LAYER_1}.self_attn.q_norm.weight (16,)"]),
    "wrong shape": (lambda t: t.update({f"{LAYER_1}.self_attn.k_proj.weight": torch.ones(64, 64)}),
                    ["wrongly shaped tensors (1)", f"{LAYER_1}.self_attn.k_proj.weight has shape (64, 64)",
                     "layers/attention/key/kernel (layer 1 of 2) needs (64, 2, 16)"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensors_are_named_and_nothing_is_written(llama, tmp_path, capsys, case):
    edit, expected = BAD_TENSORS[case]
    source = llama_variant(llama, tmp_path, edit)
    out = str(tmp_path / "converted")
    assert convert(f"--from={source}", f"--out={out}") == 1
    message = capsys.readouterr().err
    for fragment in expected + ["Nothing was written"]:
        assert fragment in message, (fragment, message)
    assert_nothing_written(out)


BAD_CONFIGS = {
    "unknown architecture": (
        lambda c: c.update(architectures=["FalconForCausalLM"], model_type="falcon"),
        "unknown architecture: config.json has architectures ['FalconForCausalLM'] and model_type 'falcon'"),
    "unsupported rope scaling": (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
                                 "rope_scaling type 'yarn' is not supported"),
    "config contradicts the tensors": (lambda c: c.update(vocab_size=256),
                                       "config.json says vocab_size=256 but model.embed_tokens.weight has 128 rows"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_json_is_refused(llama, tmp_path, capsys, case):
    edit_config, expected = BAD_CONFIGS[case]
    source = llama_variant(llama, tmp_path, edit_config=edit_config)
    out = str(tmp_path / "converted")
    assert convert(f"--from={source}", f"--out={out}") == 1
    assert expected in capsys.readouterr().err
    assert_nothing_written(out)


def test_weights_without_config_json_are_refused(llama, tmp_path, capsys):
    source = llama_variant(llama, tmp_path)
    os.remove(os.path.join(source, "config.json"))
    out = str(tmp_path / "converted")
    assert convert(f"--from={source}/model.safetensors", f"--out={out}") == 1
    assert "no config.json beside the weights" in capsys.readouterr().err
    assert_nothing_written(out)


def test_tokenizer_of_another_size_is_refused_naming_both(llama, tmp_path, capsys):
    _, root, _ = llama
    from tokenizers import Tokenizer

    tokenizer = byte_bpe_tokenizer(tmp_path)
    size = Tokenizer.from_file(tokenizer).get_vocab_size(with_added_tokens=True)
    assert size != VOCAB
    out = str(tmp_path / "converted")
    assert convert(f"--from={root / 'src'}", f"--out={out}", f"--tokenizer={tokenizer}") == 1
    message = capsys.readouterr().err
    assert f"--tokenizer={tokenizer} has {size} tokens but the decoder's embedding table has {VOCAB} rows" in message
    assert_nothing_written(out)


def test_pickled_code_in_a_bin_is_refused_without_running_it(llama, tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    source = llama_variant(llama, tmp_path)
    os.remove(os.path.join(source, "model.safetensors"))
    torch.save({"model.embed_tokens.weight": Payload()}, os.path.join(source, "pytorch_model.bin"))
    out = str(tmp_path / "converted")
    assert convert(f"--from={source}", f"--out={out}") == 1
    assert "refused because unpickling them could run arbitrary code" in capsys.readouterr().err
    assert not marker.exists()
    assert_nothing_written(out)


# ---------------------------------------------------------------- published sizes, shapes only


class ShapeSource:
    """Names and shapes of a model built on torch's meta device, with its config.json: plan() reads no data."""

    def __init__(self, module: torch.nn.Module, config: dict):
        self.path, self.config = "meta", {"config.json": config}
        self._shapes = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}

    def names(self):
        return sorted(self._shapes)

    def shape(self, name):
        return self._shapes[name]

    def read(self, name):
        raise AssertionError("plan() must not read data")


LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192))
LLAMA_2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)


@pytest.mark.parametrize("config_name, hf_config", [("llama_clip", LLAMA_3_2_1B), ("llama7b_nfnet", LLAMA_2_7B)])
def test_published_llamas_convert_to_the_shipped_configs_decoder(config_name, hf_config):
    """Llama-3.2-1B's and Llama-2-7B's config.json and tensor shapes (meta device: no memory) read as
    exactly the decoder configs/llama_clip.py and configs/llama7b_nfnet.py build, and map completely."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from flamingo_jax.convert import decoder as convert_decoder
    from flamingo_jax.convert import mapping

    from helpers import load_config

    config = LlamaConfig(**hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    source = ShapeSource(model, {**config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    arch = convert_decoder.read_architecture(source)
    assert arch.decoder == build_config(DecoderConfig, load_config(config_name).model.decoder, "model.decoder")
    target = convert_decoder.decoder_weights(arch.decoder)
    steps = mapping.plan(arch.table, source, target, fmt="llama")  # raises on any mismatch
    assert len(steps) == len(mapping.flatten_target(target))


def test_mpt_options_transformers_computes_differently_are_refused(mpt, tmp_path, capsys):
    import shutil

    _, root, _ = mpt
    shutil.copytree(root / "src", tmp_path / "src")
    with open(tmp_path / "src" / "config.json") as f:
        config = json.load(f)
    config["attn_config"] = {**config.get("attn_config", {}), "clip_qkv": 6.0, "alibi_bias_max": 4}
    with open(tmp_path / "src" / "config.json", "w") as f:
        json.dump(config, f)
    out = str(tmp_path / "converted")
    assert convert(f"--from={tmp_path / 'src'}", f"--out={out}") == 1
    message = capsys.readouterr().err
    assert "attn_config.clip_qkv=6.0" in message and "attn_config.alibi_bias_max=4" in message
    assert_nothing_written(out)


def test_mistral_7b_maps_completely_and_notes_its_sliding_window():
    """Mistral-7B-v0.1's config.json and shapes: LLaMA's table with 8 KV heads; the sliding window
    our decoder does not apply is stated in the record's notes."""
    from transformers import MistralConfig, MistralForCausalLM

    from flamingo_jax.convert import decoder as convert_decoder
    from flamingo_jax.convert import mapping

    config = MistralConfig(sliding_window=4096, max_position_embeddings=32768)  # the 7B's defaults otherwise
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    source = ShapeSource(model, {**config.to_diff_dict(), "architectures": ["MistralForCausalLM"]})
    arch = convert_decoder.read_architecture(source)
    d = arch.decoder
    assert (d.dim, d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim, d.ffw_hidden) == (4096, 32, 32, 8, 128,
                                                                                            14336)
    assert any("sliding window (4096 tokens)" in note for note in arch.assumptions)
    target = convert_decoder.decoder_weights(d)
    assert len(mapping.plan(arch.table, source, target, fmt="llama")) == len(mapping.flatten_target(target))
