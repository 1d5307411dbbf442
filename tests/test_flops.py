"""Analytic FLOPs: a hand-computed step, published NFNet figures, agreement with
the traced train step under every remat policy, MFU, and the Trainer's MFU metric."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from flamingo_jax.core import flops
from flamingo_jax.core.config import RunConfig
from flamingo_jax.core.parts import ModelParts
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.training.objectives import FlamingoObjective, make_objective
from flamingo_jax.training.optimizer import make_optimizer
from flamingo_jax.training.state import new_train_state
from flamingo_jax.training.step import make_train_step

from helpers import load_config


def hand_config(remat_policy="none") -> FlamingoConfig:
    """Small enough to count by hand: ViT 8 px (4 patches + class token, width 8),
    Resampler width 16 with 2 latents, one xattn block and one rotary LM layer of width 8."""
    config = load_config("tiny")
    m = config.model
    m.vision.update(encoder="vit", image_size=8, num_frames=1)
    m.vision.vit.update(width=8, num_layers=1, num_heads=2, patch_size=4, mlp_ratio=4.0)
    m.resampler.update(num_layers=1, dim=16, num_heads=2, head_dim=4, num_latents=2, ffw_mult=4)
    m.xattn.update(every=1, num_heads=2, head_dim=4, ffw_hidden=32)
    m.decoder.update(vocab_size=10, dim=8, num_layers=1, num_heads=2, head_dim=4, ffw_hidden=32, ffw="gelu",
                     positions="rotary")
    m.remat_policy = remat_policy
    return FlamingoConfig.from_dict(m)


ONE_PAIR = {"pairs": flops.BatchShape(batch_size=1, seq_len=3, num_media=1, num_frames=1)}


def test_hand_computed_step():
    step = flops.step_flops(hand_config(), ONE_PAIR)
    c = step.components()
    # ViT: patch embedding 2*4*48*8 = 3072; q,k,v,out 4 * 2*5*8*8 = 2560; MLP 2 * 2*5*8*32 = 5120.
    assert c["vision_encoder"] == flops.ComponentFlops(forward=10752)
    # Resampler: input projection 2*4*8*16 = 1024 (weights only in the backward); layer: query 2*2*16*8 = 512,
    # key+value over 4+2 tokens 2 * 2*6*16*8 = 3072, out 512, FFW 2 * 2*2*16*64 = 8192 -> 12288 (3x).
    assert c["resampler"] == flops.ComponentFlops(forward=1024 + 12288, backward=1024 + 2 * 12288)
    # xattn: query 2*3*8*8 = 384, key+value of 2 visual tokens 2 * 2*2*16*8 = 1024, out 384, FFW 2 * 2*3*8*32 = 3072.
    assert c["xattn"] == flops.ComponentFlops(forward=4864, backward=2 * 4864)
    # LM: q,k,v,out 4 * 2*3*8*8 = 1536, FFW 2 * 2*3*8*32 = 3072; activation gradients only (1x).
    assert c["lm"] == flops.ComponentFlops(forward=4608, backward=4608)
    # Scores + values: ViT 2 * 2*5*5*8 = 800 (forward only), Resampler 2 * 2*2*6*8 = 384,
    # xattn 2 * 2*3*2*8 = 192, LM 2 * 2*3*3*8 = 288; backward 2x (both operands are activations).
    assert c["attention"] == flops.ComponentFlops(forward=800 + 384 + 192 + 288, backward=2 * (384 + 192 + 288))
    # Logits over 10 + 1 tokens: 2*3*8*11 = 528; backward: input gradient 528, new-token row 2*3*8 = 48.
    assert c["logits"] == flops.ComponentFlops(forward=528, backward=576)
    assert step.recompute == 0 and step.total == step.model == step.forward + step.backward


def test_hand_computed_full_remat_recompute():
    step = flops.step_flops(hand_config("full"), ONE_PAIR)
    c = step.components()
    # Everything but the Resampler's and the LM's FFW output projections (2*2*16*64 = 4096, 2*3*32*8 = 1536).
    assert c["resampler"].recompute == 12288 - 4096
    assert c["xattn"].recompute == 4864
    assert c["lm"].recompute == 4608 - 1536
    assert c["attention"].recompute == 384 + 192 + 288
    assert c["vision_encoder"].recompute == c["logits"].recompute == 0
    assert step.model == flops.step_flops(hand_config(), ONE_PAIR).model  # remat adds work, not model FLOPs


def test_nfnet_matches_the_published_flops():
    # Brock et al. 2021, Table 3 (multiply-adds at the test resolution): F0 12.38B at 256 px, F6 377.28B at 576 px.
    assert flops.nfnet_forward_flops("F0", 256) / 2 == pytest.approx(12.38e9, rel=1e-3)
    assert flops.nfnet_forward_flops("F6", 576) / 2 == pytest.approx(377.28e9, rel=1e-3)


def abstract_step(model_config, batches, num_microbatches):
    parts = ModelParts.flamingo(model_config)
    optimizer = make_optimizer(load_config("tiny").train)
    params, frozen = parts.abstract()
    state = jax.eval_shape(lambda p: new_train_state(p, optimizer, 0), params)
    step = make_train_step(FlamingoObjective.for_model(parts.cfg), parts, optimizer, {name: 1.0 for name in batches},
                           tuple(batches), num_microbatches)

    def fields(b, length, media, frames, size):
        sds = jax.ShapeDtypeStruct
        return {"tokens": sds((b, length), jnp.int32), "targets": sds((b, length), jnp.int32),
                "loss_mask": sds((b, length), jnp.float32), "media_index": sds((b, length), jnp.int32),
                "media": sds((b, media, frames, size, size, 3), jnp.float32)}

    arrays = {name: fields(*shape) for name, shape in batches.items()}
    return step, (state, frozen, arrays), {name: flops.BatchShape.of(a) for name, a in arrays.items()}


@pytest.mark.parametrize("remat_policy,llama,first_layer", [("none", False, 0), ("full", False, 0),
                                                            ("dots_no_batch", True, 0), ("full", False, 2)])
def test_analytic_equals_the_traced_train_step(remat_policy, llama, first_layer):
    """configs/tiny.py (NFNet, Transformer-XL LM) or a LLaMA-style variant (ViT, rotary, SwiGLU, grouped
    queries); three datasets, two micro-batches. Every matmul of the program JAX hands to XLA is counted.
    first_layer=2 with a block every 3rd of 4 layers is OpenFlamingo's placement with a lead of two
    plain layers, no full group and a tail of two: one block."""
    config = load_config("tiny")
    config.model.remat_policy = remat_policy
    if first_layer:
        config.model.xattn.update(every=3, first_layer=first_layer)
    if llama:
        config.model.vision.encoder = "vit"
        config.model.vision.vit.update(width=32, num_layers=2, num_heads=2, patch_size=16)
        config.model.decoder.update(ffw="swiglu", positions="rotary", num_kv_heads=2, tie_embeddings=False)
    model_config = FlamingoConfig.from_dict(config.model)
    batches = {"interleaved": (4, 32, 3, 1, 64), "image_text": (4, 16, 1, 1, 64), "video_text": (2, 16, 1, 4, 64)}
    step, args, shapes = abstract_step(model_config, batches, num_microbatches=2)
    analytic = flops.step_flops(model_config, shapes, num_microbatches=2)
    assert flops.traced_flops(step, *args) == pytest.approx(analytic.total, rel=1e-9)
    assert (analytic.recompute > 0) == (remat_policy != "none")


def test_mfu():
    # 1.1 PFLOP in 2 s on 4 v4 chips (4 x 275 TFLOP/s peak): half the peak.
    assert flops.mfu(1.1e15, 2.0, 4, "v4") == pytest.approx(0.5)
    assert flops.mfu(1.1e15, 1.0, 4, "v4") == pytest.approx(1.0)
    assert flops.mfu(989e12, 1.0, 1, "h100") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="known chips"):
        flops.mfu(1e12, 1.0, 1, "cpu")
    with pytest.raises(ValueError, match="positive"):
        flops.mfu(1e12, 0.0, 1, "v4")


@pytest.mark.parametrize("kind,chip", [("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5", "v5p"),
                                       ("TPU v5p", "v5p"), ("TPU v6 lite", "v6e"),
                                       ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("cpu", None), ("NVIDIA A100-SXM4-40GB", None)])
def test_chip_from_device_kind(kind, chip):
    assert flops.chip_from_device_kind(kind) == chip


def test_trainer_logs_mfu_where_the_chip_is_known(trained_run):
    """The shared tiny run trained as if on a TPU v4: each step's MFU is the analytic model FLOPs
    over the step time and the chips' peak."""
    assert flops.detect_chip() is None  # CPU: no peak, so no MFU metric in ordinary runs
    info = json.loads((trained_run / "run_info.json").read_text())
    config = info["config"]
    records = [json.loads(line) for line in (trained_run / "run" / "metrics.jsonl").read_text().splitlines()]
    shapes = {name: flops.BatchShape(spec["batch_size"], spec["max_len"],
                                     spec["max_images"] if spec["kind"] == "interleaved" else 1, 1,
                                     config["data"]["image_size"])
              for name, spec in info["specs"].items()}
    assert set(shapes) == {"image_text", "interleaved"}
    model_flops = flops.step_flops(FlamingoConfig.from_dict(config["model"]), shapes).model
    assert len(records) == 2
    for record in records:
        expected = model_flops / (record["step_time"] * jax.device_count() * flops.CHIPS["v4"].peak_bf16_flops)
        assert record["mfu"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("positions, first_layer", [("relative", 0), ("rotary", 0), ("relative", 1)])
def test_a_decoding_step_costs_what_the_analytic_count_says_and_grows_only_with_attention(positions, first_layer):
    """One decoding step traced at two cache sizes: equal to `decode_step_flops` at each, and the
    extra slots cost only attention over them (no slots x width x width position projection)."""
    from flax import nnx

    from flamingo_jax.inference import decoding
    from flamingo_jax.models import unrolled
    from flamingo_jax.models.flamingo import Flamingo

    from helpers import tiny_model_config

    cfg = tiny_model_config(positions=positions)
    cfg = dataclasses.replace(cfg, xattn=dataclasses.replace(cfg.xattn, first_layer=first_layer))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Flamingo(cfg, rngs=nnx.Rngs(0))))
    batch, num_media, prompt = 2, 2, 8

    sds = jax.ShapeDtypeStruct
    args = (sds((batch, prompt), jnp.int32), sds((batch, num_media, 1, 32, 32, 3), jnp.float32),
            sds((batch, prompt), jnp.int32), sds((batch, prompt), jnp.int32), sds((batch, prompt), bool),
            sds((batch, 1), jnp.int32))

    def step_flops(num_slots):
        context = jax.eval_shape(lambda s, *a: decoding.prefill(nnx.merge(graphdef, s), *a[:5], num_slots),
                                 state, *args[:5])
        return flops.traced_flops(lambda s, c, t: decoding.extend(nnx.merge(graphdef, s), c, t), state, context,
                                  args[5])

    small, large = step_flops(16), step_flops(64)
    assert small == pytest.approx(flops.decode_step_flops(cfg, batch, 16, num_media), rel=1e-9)
    assert large == pytest.approx(flops.decode_step_flops(cfg, batch, 64, num_media), rel=1e-9)
    # Per layer and slot: scores and values (2 x 2 FLOPs per head dim), and the relative term q . r (2).
    per_slot = (4 + (2 if positions == "relative" else 0)) * cfg.decoder.num_heads * cfg.decoder.head_dim
    assert large - small == pytest.approx(batch * cfg.decoder.num_layers * 48 * per_slot, rel=1e-9)

    # The per-layer path (models/unrolled.py) does the same work, plus attention to the new
    # token's own key beside the cache (scores and values, no position-table term).
    model_state, layer_states = jax.eval_shape(lambda s: unrolled.split_for_decoding(nnx.merge(graphdef, s))[1:],
                                               state)
    merge = lambda s, ls: unrolled.UnrolledFlamingo.merge(graphdef, s, ls)
    context = jax.eval_shape(lambda s, ls, *a: decoding.prefill(merge(s, ls), *a, 16), model_state, layer_states,
                             *args[:5])
    per_layer = flops.traced_flops(lambda s, ls, c, t: decoding.extend(merge(s, ls), c, t)[0], model_state,
                                   layer_states, context, args[5])
    extra_key = 4 * cfg.decoder.num_heads * cfg.decoder.head_dim
    assert per_layer == pytest.approx(small + batch * cfg.decoder.num_layers * extra_key, rel=1e-9)


@pytest.mark.parametrize("encoder,remat_policy", [("nfnet", "full"), ("vit", "dots_no_batch")])
def test_contrastive_analytic_equals_the_traced_train_step(encoder, remat_policy):
    """The dual encoder's step (both towers trained; images and videos, frames pooled): every matmul and
    convolution counted, NFNet's strided convolutions' input gradients and remat recompute included."""
    config = load_config("tiny")
    config.objective = "contrastive"
    config.model.update(remat_policy=remat_policy)
    config.model.vision.encoder = encoder
    config.model.vision.vit.update(width=32, num_layers=2, num_heads=2, patch_size=16)
    config.contrastive.text.update(dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_ratio=2, max_len=32,
                                   embed_dim=24)
    objective = make_objective(RunConfig.from_config(config))
    parts, optimizer = objective.parts(), objective.optimizer()
    params, frozen = parts.abstract()
    state = jax.eval_shape(lambda p: new_train_state(p, optimizer, 0), params)
    sds = jax.ShapeDtypeStruct
    arrays = {name: {"tokens": sds((b, 16), jnp.int32), "targets": sds((b, 16), jnp.int32),
                     "loss_mask": sds((b, 16), jnp.float32), "media_index": sds((b, 16), jnp.int32),
                     "media": sds((b, 1, frames, 64, 64, 3), jnp.float32)}
              for name, (b, frames) in {"image_text": (4, 1), "video_text": (2, 4)}.items()}
    step = make_train_step(objective, parts, optimizer, {name: 1.0 for name in arrays}, tuple(arrays), 1)
    analytic = objective.step_flops({name: flops.BatchShape.of(a) for name, a in arrays.items()})
    assert flops.traced_flops(step, state, frozen, arrays) == pytest.approx(analytic.total, rel=1e-9)
    assert analytic.recompute > 0 and analytic.vision_encoder.backward > analytic.vision_encoder.forward
