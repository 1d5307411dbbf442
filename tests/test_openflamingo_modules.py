"""OpenFlamingo against ours: its own `Flamingo` (a tiny open_clip tower and a tiny LLaMA,
random weights, gates opened), its state dict mapped by convert/openflamingo.py. Its
Perceiver and xattn blocks, the whole forward pass, greedy and beam generation, the export
back; OpenFlamingo's xattn placement in our model (a loop over layers, cached decoding,
parameter and FLOP counts) and the configs of its released models. Run with -s to see
the max abs errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision_cpu  # noqa: F401  (before transformers / open_clip import torchvision)
from flax import nnx

from flamingo_jax.convert import hf_llama, open_clip_vit, openflamingo
from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.convert.mapping import Rule, Table
from flamingo_jax.convert.sources import ArraySource
from flamingo_jax.data.sequence import openflamingo_media_index
from flamingo_jax.inference import decoding
from flamingo_jax.models import layers, summary
from flamingo_jax.models.config import (
    DecoderConfig,
    FlamingoConfig,
    ResamplerConfig,
    VisionConfig,
    ViTConfig,
    XAttnConfig,
)
from flamingo_jax.models.decoder import uncached_slots
from flamingo_jax.models.flamingo import Flamingo

import openflamingo_case as case
from openflamingo_case import B, M, T

VIS, LM, LAYERS, EVERY, VOCAB, NEW = 16, 24, 6, 2, 40, 3  # OpenFlamingo adds <|endofchunk|>, <image>, <PAD>
EOC, IMAGE = VOCAB, VOCAB + 1
PATCHES = 5


def our_config(**resampler) -> FlamingoConfig:
    """OpenFlamingo's choices at toy width: Resampler 6 x 8 heads of 64 with 64 latents and xattn
    8 x 64 (fixed by its Flamingo class), GELU, no frame table, blocks before layers 1, 3, 5."""
    return FlamingoConfig(
        vision=VisionConfig(encoder="vit", image_size=16, num_frames=resampler.pop("num_frames", 1),
                            vit=ViTConfig(width=VIS, num_layers=1, num_heads=2, patch_size=8,
                                          activation="gelu_exact")),
        resampler=ResamplerConfig(num_layers=6, dim=VIS, num_heads=8, head_dim=64, num_latents=64,
                                  activation="gelu_exact", **{"frame_embedding": False, **resampler}),
        xattn=XAttnConfig(every=EVERY, first_layer=EVERY - 1, num_heads=8, head_dim=64, activation="gelu_exact",
                          media_association="openflamingo"),
        decoder=DecoderConfig(vocab_size=VOCAB, dim=LM, num_layers=LAYERS, num_heads=2, head_dim=12, ffw="swiglu",
                              ffw_hidden=32, positions="rotary", max_len=64, tie_embeddings=False),
        num_new_tokens=NEW, dtype="float32", frozen_param_dtype="float32", trainable_param_dtype="float32",
    ).validate()


@pytest.fixture(scope="module")
def reference():
    """OpenFlamingo's Flamingo as its factory assembles it, without downloads, gates opened."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower
    from open_flamingo import Flamingo as OpenFlamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vision = torch.nn.Module()
    vision.visual = _build_vision_tower(8, CLIPVisionCfg(layers=1, width=VIS, head_width=8, patch_size=8,
                                                         image_size=16))
    vision.visual.output_tokens = True
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=LM, intermediate_size=32,
                                      num_hidden_layers=LAYERS, num_attention_heads=2, tie_word_embeddings=False))
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name("model.layers")
    lm.resize_token_embeddings(VOCAB + NEW)
    model = OpenFlamingo(vision, lm, EOC, IMAGE, vis_dim=VIS, cross_attn_every_n_layers=EVERY).eval()
    with torch.no_grad():
        for block in model.lang_encoder.gated_cross_attn_layers:
            if block is not None:
                block.attn_gate.uniform_(0.3, 1.0)
                block.ff_gate.uniform_(-1.0, -0.3)
    return model


@pytest.fixture(scope="module")
def converted(reference):
    cfg = our_config()
    source = ArraySource("openflamingo", reference.state_dict())
    model = Flamingo(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, openflamingo.convert_trainable(source, cfg))
    nnx.update(model, state)
    return model


def token_ids(rng) -> np.ndarray:
    """The shared case's two rows (openflamingo_case.token_ids) at this file's vocabulary."""
    return case.token_ids(rng, VOCAB)


def generation_case(reference, seed: int, new: int, **generate):
    """The shared case as generation prompts: OpenFlamingo's `generate` continuation [B, new] and our
    prefill inputs, positions numbered from the attention mask as HF's generate does."""
    ids, valid, pixels = case.inputs(VOCAB, 16, seed)
    with torch.no_grad():
        theirs = reference.generate(torch.from_numpy(pixels), torch.from_numpy(ids),
                                    attention_mask=torch.from_numpy(valid).long(), max_new_tokens=new,
                                    do_sample=False, pad_token_id=0, **generate).numpy()[:, T:]
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    prompt = (jnp.asarray(ids), jnp.asarray(pixels.transpose(0, 1, 2, 4, 5, 3)),
              jnp.asarray(openflamingo_media_index(ids, IMAGE)), jnp.asarray(positions), jnp.asarray(valid))
    return theirs, prompt


def test_openflamingo_media_index_is_the_cumsum_of_image_tokens():
    ids = token_ids(np.random.default_rng(0))
    index = openflamingo_media_index(ids, IMAGE)
    np.testing.assert_array_equal(index[0], [-1, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(index[1], [-1, -1, -1, -1, 0, 0, 1, 1, 1, 1, 2, 2])


def test_state_dict_names_and_placement(reference):
    names = list(reference.state_dict())
    layout = openflamingo.lm_layout(names)
    assert layout.family == "llama"
    blocks = sorted({int(n.split(".")[2]) for n in names if n.startswith("lang_encoder.gated_cross_attn_layers.")})
    assert blocks == [i for i in range(LAYERS) if (i + 1) % EVERY == 0] == list(our_config().xattn_layers)
    # The FlamingoLayer wrapper repeats each block under the decoder layers; they are checked equal.
    assert any(n.startswith("lang_encoder.model.layers.1.gated_cross_attn_layer.") for n in names)
    assert any(n.startswith("lang_encoder.model.layers.0.decoder_layer.") for n in names)
    state = dict(reference.state_dict())
    alias = "lang_encoder.model.layers.1.gated_cross_attn_layer.attn.to_q.weight"
    state[alias] = state[alias] + 1
    with pytest.raises(ConversionError, match="differs from"):
        openflamingo.check_aliases(ArraySource("edited", state), layout)
    # A checkpoint with blocks where the config has none is refused, naming the tensors.
    with pytest.raises(ConversionError, match="unexpected tensors"):
        openflamingo.convert_trainable(ArraySource("every-1", reference.state_dict()),
                                       dataclasses.replace(our_config(), xattn=dataclasses.replace(
                                           our_config().xattn, every=3, first_layer=2)))


def test_new_token_rows_and_frozen_vocabulary(reference, converted):
    embed = reference.lang_encoder.model.embed_tokens.weight.detach().numpy()
    head = reference.lang_encoder.lm_head.weight.detach().numpy()
    np.testing.assert_array_equal(converted.new_token_embedding[...], embed[VOCAB:])
    np.testing.assert_array_equal(converted.new_token_unembedding[...], head[VOCAB:].T)
    cfg = converted.cfg
    layout = openflamingo.lm_layout(list(reference.state_dict()))
    target = {"decoder": {"embedding": jax.ShapeDtypeStruct((VOCAB, LM), jnp.float32),
                          "unembedding": jax.ShapeDtypeStruct((LM, VOCAB), jnp.float32)}}
    frozen = openflamingo.convert(openflamingo.frozen_embedding_table(cfg, layout),
                                  ArraySource("of", reference.state_dict()), target)
    np.testing.assert_array_equal(frozen["decoder"]["embedding"], embed[:VOCAB])
    np.testing.assert_array_equal(frozen["decoder"]["unembedding"], head[:VOCAB].T)


def _resampler_parity(perceiver, ours, frames, seed):
    features = torch.randn(B, M, frames, PATCHES, VIS, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = perceiver(features).numpy()
    got = np.asarray(nnx.jit(lambda r, x: r(x))(ours, jnp.asarray(features.numpy())))
    assert got.shape == expected.shape == (B, M, 64, VIS)
    error = float(np.abs(got - expected).max())
    print(f"Resampler vs OpenFlamingo ({frames} frame(s)): max abs error {error:.2e}")  # shown with -s
    assert error < 1e-5, error


def test_resampler_equals_openflamingo(reference, converted):
    _resampler_parity(reference.perceiver, converted.resampler, 1, 1)


def test_resampler_with_frame_and_media_tables_equals_openflamingo(reference):
    """OpenFlamingo's optional `frame_embs` (max_num_frames) and `media_time_embs` (max_num_media)."""
    from open_flamingo.src.helpers import PerceiverResampler

    torch.manual_seed(1)
    perceiver = PerceiverResampler(dim=VIS, max_num_media=4, max_num_frames=2).eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("perceiver.")}
    state.update({f"perceiver.{k}": v for k, v in perceiver.state_dict().items()})
    cfg = our_config(frame_embedding=True, num_frames=2, media_positions=4)
    model = nnx.eval_shape(lambda: Flamingo(cfg, rngs=nnx.Rngs(0)))
    pure = openflamingo.convert_trainable(ArraySource("of", state), cfg)
    state = nnx.state(model.resampler)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure["resampler"]))
    _resampler_parity(perceiver, nnx.merge(nnx.graphdef(model.resampler), state), 2, 2)


def xattn_block(model: Flamingo, index: int):
    graphdef, state = nnx.split(model.xattn)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))


def test_xattn_blocks_equal_openflamingo_with_its_media_locations(reference, converted):
    rng = np.random.default_rng(3)
    ids = token_ids(rng)
    x = rng.standard_normal((B, T, LM)).astype(np.float32)
    visual = rng.standard_normal((B, M, 64, VIS)).astype(np.float32)
    media_index = jnp.asarray(openflamingo_media_index(ids, IMAGE))
    errors = []
    for j, layer in enumerate(converted.cfg.xattn_layers):
        theirs = reference.lang_encoder.gated_cross_attn_layers[layer]
        block = xattn_block(converted, j)
        with torch.no_grad():
            expected = theirs(torch.from_numpy(x), torch.from_numpy(visual),
                              media_locations=torch.from_numpy(ids == IMAGE)).numpy()
            # Generation: OpenFlamingo's cached media has new tokens see the prompt's last image.
            cached = theirs(torch.from_numpy(x[:, :1]), torch.from_numpy(visual),
                            media_locations=torch.from_numpy(ids == IMAGE), use_cached_media=True).numpy()
        run = nnx.jit(lambda blk, y, v, index: blk(y, blk.project_media(v), index, M))
        got = np.asarray(run(block, x, visual, media_index))
        got_cached = np.asarray(run(block, x[:, :1], visual, media_index[:, -1:]))
        errors += [np.abs(got - expected).max(), np.abs(got_cached - cached).max()]
        # Text before the first image sees nothing: only the (gated) FFW acts there.
        assert float(np.abs(got - x)[media_index < 0].min()) > 0
    print(f"xattn blocks vs OpenFlamingo: max abs error {max(errors):.2e}")  # shown with -s
    assert max(errors) < 1e-5, max(errors)


def hand_written_forward(model: Flamingo, tokens, media, media_index):
    """The conditioned LM as a plain loop: block j before LM layer xattn_layers[j]."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    slots = uncached_slots(positions, jnp.ones(tokens.shape, bool))
    visual = model.encode_media(media)
    layer_graph, layer_state = nnx.split(model.decoder.layers)
    x = model.embed(tokens)
    blocks = {layer: j for j, layer in enumerate(model.cfg.xattn_layers)}
    for i in range(model.cfg.decoder.num_layers):
        if i in blocks:
            block = xattn_block(model, blocks[i])
            x = block(x, block.project_media(visual), media_index, media.shape[1])
        x, _ = nnx.merge(layer_graph, jax.tree.map(lambda a: a[i], layer_state))(x, positions, slots)
    return model.logits(model.decoder.final_norm(x))


def test_openflamingo_placement_equals_a_loop_over_layers(converted):
    assert converted.cfg.xattn_layout == (1, 2, 2, 1)  # layer 0 plain, groups [1, 2], [3, 4], tail [5]
    ids = jnp.asarray(token_ids(np.random.default_rng(4)))
    media = jax.random.normal(jax.random.key(0), (B, M, 1, 16, 16, 3))
    media_index = jnp.asarray(openflamingo_media_index(np.asarray(ids), IMAGE))
    ours = nnx.jit(lambda m, t, v, i: m(t, v, i))(converted, ids, media, media_index)
    loop = nnx.jit(hand_written_forward)(converted, ids, media, media_index)
    np.testing.assert_allclose(ours, loop, rtol=1e-5, atol=1e-5)
    # The placement matters: shifted to the paper's (first_layer=0) the same weights give other logits.
    paper = nnx.merge(nnx.graphdef(Flamingo(dataclasses.replace(converted.cfg, xattn=dataclasses.replace(
        converted.cfg.xattn, first_layer=0)), rngs=nnx.Rngs(0))), nnx.state(converted))
    shifted = nnx.jit(lambda m, t, v, i: m(t, v, i))(paper, ids, media, media_index)
    assert float(jnp.abs(shifted - ours).max()) > 1e-3


def test_cached_decoding_equals_the_uncached_forward_under_openflamingo_placement(converted):
    """Left-padded prompts prefilled into the cache (lead, groups and tail), then 4 tokens
    extended one at a time: every logit equals the full forward's at the same position."""
    rng = np.random.default_rng(5)
    ids = token_ids(rng)
    ids[:, 8:] = rng.integers(1, VOCAB, (B, T - 8))  # text only after the prompt
    prompt, steps = ids[:, :8], ids[:, 8:]
    media = jax.random.normal(jax.random.key(1), (B, M, 1, 16, 16, 3))
    media_index = openflamingo_media_index(ids, IMAGE)
    valid = ids != 0
    valid[0] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    full = nnx.jit(lambda m, *a: m(*a))(converted, jnp.asarray(ids), media, jnp.asarray(media_index),
                                        jnp.asarray(positions), jnp.asarray(valid))

    @nnx.jit
    def cached(model, prompt, media, index, positions, valid, steps):
        context = decoding.prefill(model, prompt, media, index, positions, valid, T)
        logits = [context.last_logits]
        for step in range(steps.shape[1] - 1):
            step_logits, context = decoding.extend(model, context, steps[:, step:step + 1])
            logits.append(step_logits[:, -1])
        return jnp.stack(logits, axis=1)

    # No `<image>` among the extended tokens, so they see the prompt's last image, as OpenFlamingo.
    assert (media_index[:, 8:] == media_index[:, 7:8]).all()
    got = cached(converted, jnp.asarray(prompt), media, jnp.asarray(media_index[:, :8]),
                 jnp.asarray(positions[:, :8]), jnp.asarray(valid[:, :8]), jnp.asarray(steps))
    np.testing.assert_allclose(got, np.asarray(full)[:, 7:T - 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_layers, every, blocks", [(24, 1, 24), (32, 2, 16), (32, 4, 8), (7, 3, 2)])
def test_openflamingo_block_counts_in_params_and_flops(num_layers, every, blocks):
    from flamingo_jax.core import flops

    base = our_config()
    decoder = dataclasses.replace(base.decoder, num_layers=num_layers)
    cfg = dataclasses.replace(base, decoder=decoder, xattn=dataclasses.replace(base.xattn, every=every,
                                                                               first_layer=every - 1))
    assert cfg.xattn_layers == tuple(i for i in range(num_layers) if (i + 1) % every == 0)
    assert cfg.num_xattn_blocks == blocks
    one_block = summary.param_counts(dataclasses.replace(cfg, decoder=dataclasses.replace(decoder, num_layers=1),
                                                         xattn=dataclasses.replace(cfg.xattn, every=1,
                                                                                   first_layer=0)))
    assert summary.param_counts(cfg)["trainable_xattn"] == blocks * one_block["trainable_xattn"]
    shape = {"x": flops.BatchShape(batch_size=1, seq_len=8, num_media=1, num_frames=1)}
    per_block = flops.step_flops(dataclasses.replace(cfg, xattn=dataclasses.replace(cfg.xattn, every=num_layers,
                                                                                    first_layer=0)), shape)
    assert flops.step_flops(cfg, shape).xattn.forward == blocks * per_block.xattn.forward


@pytest.mark.parametrize("name, lm_dim, every, blocks", [("openflamingo_3b", 2048, 1, 24),
                                                         ("openflamingo_4b", 2560, 2, 16),
                                                         ("openflamingo_9b", 4096, 4, 8),
                                                         ("openflamingo_9b_v1", 4096, 4, 8)])
def test_openflamingo_configs_have_its_trainable_parameters(name, lm_dim, every, blocks):
    """Our counts equal OpenFlamingo's own modules' at full size (built on torch's meta device:
    nothing is allocated), and the blocks sit where its (i + 1) % n == 0 puts them."""
    from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler

    from helpers import load_config

    cfg = FlamingoConfig.from_dict(load_config(name).model)
    assert cfg.decoder.dim == lm_dim and cfg.num_xattn_blocks == blocks
    assert cfg.xattn_layers == tuple(i for i in range(cfg.decoder.num_layers) if (i + 1) % every == 0)
    numel = lambda module: sum(p.numel() for p in module.parameters())
    with torch.device("meta"):
        block = numel(GatedCrossAttentionBlock(dim=lm_dim, dim_visual=cfg.vision.vit.width))
        resampler = numel(PerceiverResampler(dim=cfg.vision.vit.width))
    counts = summary.param_counts(cfg)
    assert counts["trainable_xattn"] == blocks * block
    assert counts["trainable_resampler"] == resampler
    assert counts["trainable_new_tokens"] == 3 * lm_dim * (1 if cfg.decoder.tie_embeddings else 2)


def llama_decoder_table(cfg: FlamingoConfig) -> Table:
    """The Hugging Face LLaMA converter's table (convert/hf_llama.py), its layers read where OpenFlamingo
    wraps them (`lang_encoder.model.layers.I.decoder_layer`) into our frozen `decoder/*`; the
    vocabulary rows come from `openflamingo.frozen_embedding_table` instead."""
    def wrapped(rule: Rule) -> Rule:
        source = "lang_encoder." + rule.source.replace("model.layers.{layer}.", "model.layers.{layer}.decoder_layer.")
        return dataclasses.replace(rule, target=f"decoder/{rule.target}", source=source)

    rules = tuple(wrapped(rule) for rule in hf_llama.table(cfg.decoder, "tiny LLaMA").rules
                  if rule.target not in ("embedding", "unembedding"))
    embeddings = openflamingo.frozen_embedding_table(cfg, openflamingo.LM_LAYOUTS["llama"])
    return Table(rules + embeddings.rules, ignored=(".*",), description="tiny LLaMA in OpenFlamingo")


@pytest.fixture(scope="module")
def whole(reference, converted):
    """Our converted model with OpenFlamingo's frozen towers too (see the forward test)."""
    source = ArraySource("openflamingo", reference.state_dict())
    model = nnx.clone(converted)
    frozen = nnx.state(model, layers.Frozen)
    pure = nnx.to_pure_dict(frozen)
    vision = openflamingo.convert(open_clip_vit.table(model.cfg.vision.vit, "vision_encoder.", "tiny ViT"), source,
                                  pure["vision_encoder"])
    decoder = openflamingo.convert(llama_decoder_table(model.cfg), source, {"decoder": pure["decoder"]})
    nnx.replace_by_pure_dict(frozen, {"vision_encoder": vision, **decoder})
    nnx.update(model, frozen)
    return model


def test_whole_forward_equals_openflamingo(reference, whole):
    """OpenFlamingo's logits on two left-padded rows with 3 images each, text before the first
    image and several `<|endofchunk|>`: its vision tower by our open_clip table, its LM by the
    test's LLaMA table, everything trainable by convert/openflamingo.py."""
    model = whole
    ids, valid, pixels = case.inputs(VOCAB, 16)
    expected = case.reference_logits(reference, ids, valid, pixels)
    got = case.our_logits(model, ids, valid, pixels, IMAGE)
    with torch.no_grad():  # the images matter: other pixels change OpenFlamingo's logits after the first image
        other = reference(torch.from_numpy(-pixels), torch.from_numpy(ids),
                          attention_mask=torch.from_numpy(valid).long()).logits.numpy()
    seen = openflamingo_media_index(ids, IMAGE) >= 0
    assert float(np.abs(other - expected).max(-1)[seen & valid].min()) > 1e-3
    np.testing.assert_allclose(other[~seen & valid], expected[~seen & valid], atol=1e-6)
    assert got.shape == expected.shape == (B, T, VOCAB + NEW)
    error = float(np.abs(got - expected)[valid].max())
    print(f"whole Flamingo vs OpenFlamingo: max abs logit error {error:.2e}")  # shown with -s
    assert error < 1e-4, error


def test_greedy_generation_equals_openflamingo_generate(reference, whole):
    """20 greedy tokens after left-padded prompts ending in text after their last image: the
    same ids as OpenFlamingo's `generate` (HF numbers positions from the attention mask there)."""
    new = 20
    theirs, prompt = generation_case(reference, 7, new, num_beams=1)

    @nnx.jit
    def greedy(model, tokens, media, media_index, positions, valid):
        context = decoding.prefill(model, tokens, media, media_index, positions, valid, T + new)
        return decoding.decode(model, context, jax.random.key(0), max_new_tokens=new, stop_ids=(EOC,), pad_id=0,
                               choose=decoding.greedy_chooser())

    ours = greedy(whole, *prompt)
    print(f"greedy generation: {np.asarray(ours.lengths).tolist()} tokens equal OpenFlamingo's")  # shown with -s
    for row in range(B):
        length = int(ours.lengths[row])
        np.testing.assert_array_equal(np.asarray(ours.tokens[row, :length]), theirs[row, :length])
        assert length == new or theirs[row, length - 1] == EOC  # both stopped at <|endofchunk|>
    assert len({tuple(np.asarray(r)) for r in ours.tokens}) == B  # rows differ: no mixed-up batch


def test_beam_search_best_sequence_equals_openflamingo_generate(reference, whole):
    """3 beams, no length penalty (HF's length_penalty=0, our alpha=0): the same best sequence."""
    new = 8
    theirs, prompt = generation_case(reference, 8, new, num_beams=3, length_penalty=0.0)

    @nnx.jit
    def beams(model, tokens, media, media_index, positions, valid):
        context = decoding.prefill(model, tokens, media, media_index, positions, valid, T + new)
        return decoding.beam_search(model, context, num_beams=3, max_new_tokens=new, stop_ids=(EOC,), pad_id=0)

    ours = beams(whole, *prompt)
    for row in range(B):
        length = int(ours.lengths[row])
        np.testing.assert_array_equal(np.asarray(ours.tokens[row, :length]), theirs[row, :length])


def test_export_round_trips_into_openflamingo(reference, whole):
    """Our trainable state exported in OpenFlamingo's layout loads with strict=False into an
    OpenFlamingo model whose trainable weights were scrambled and gives back its logits."""
    import copy

    layout = openflamingo.LM_LAYOUTS["llama"]
    exported = openflamingo.export_trainable(
        nnx.to_pure_dict(nnx.state(whole, nnx.Param)), whole.cfg, layout,
        embedding=np.asarray(whole.decoder.embedding[...]), unembedding=np.asarray(whole.decoder.unembedding[...]))
    original = reference.state_dict()
    assert set(exported) <= set(original)
    assert {n for n in original if n.startswith(("perceiver.", "lang_encoder.gated_cross_attn_layers."))} <= set(
        exported)
    for name, value in exported.items():  # the round trip is exact: only layouts change
        np.testing.assert_array_equal(value, original[name].numpy(), err_msg=name)

    target = copy.deepcopy(reference)
    rng = np.random.default_rng(9)
    ids, pixels = token_ids(rng), torch.from_numpy(rng.standard_normal((B, M, 1, 3, 16, 16)).astype(np.float32))
    with torch.no_grad():
        for module in (target.perceiver, target.lang_encoder.gated_cross_attn_layers,
                       target.lang_encoder.get_input_embeddings(), target.lang_encoder.get_output_embeddings()):
            for parameter in module.parameters():
                parameter.normal_()
        before = reference(pixels, torch.from_numpy(ids)).logits
        assert float((target(pixels, torch.from_numpy(ids)).logits - before).abs().max()) > 1e-2  # scrambled
    result = target.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        after = target(pixels, torch.from_numpy(ids)).logits
    error = float((after - before).abs().max())
    print(f"export round trip: max abs logit error {error:.2e}")  # shown with -s
    assert error < 1e-5


def test_params_cli_reads_an_openflamingo_config(tmp_path, run_cli):
    import json

    from helpers import load_config

    out = tmp_path / "counts.json"
    done = run_cli("flamingo_jax.params", "--config=configs/openflamingo_9b.py", f"--json={out}", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(out.read_text())
    assert counts["config"] == "openflamingo-9b"
    cfg = FlamingoConfig.from_dict(load_config("openflamingo_9b").model)
    assert counts["trainable_xattn"] == summary.param_counts(cfg)["trainable_xattn"] > 0
