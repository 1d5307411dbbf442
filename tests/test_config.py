"""Configs: impossible values fail early and clearly; paper parameter counts."""

import dataclasses
import functools

import pytest

from flamingo_jax.models import summary
from flamingo_jax.models.config import ConfigError, FlamingoConfig

from helpers import load_config

# A config's counts, once per session: an 80B abstract model takes a second or two to build.
param_counts = functools.cache(summary.param_counts)

# Paper Table 5 (billions).
TABLE5 = {
    "3b": dict(total=3.2, frozen_lm=1.4, trainable_xattn=1.2, trainable_resampler=0.194),
    "9b": dict(total=9.3, frozen_lm=7.1, trainable_xattn=1.6, trainable_resampler=0.194),
    "80b": dict(total=80.0, frozen_lm=70.0, trainable_xattn=10.0, trainable_resampler=0.194),
}


@pytest.mark.parametrize("name", sorted(TABLE5))
def test_parameter_counts_match_paper_table5(name):
    counts = param_counts(FlamingoConfig.from_dict(load_config(name).model))
    for column, billions in TABLE5[name].items():
        assert counts[column] / 1e9 == pytest.approx(billions, rel=0.05), (column, counts[column])
    assert counts["frozen_vision"] / 1e9 == pytest.approx(0.435, rel=0.02)


# Exact counts from the abstract model's shapes (models/summary.py): any change to a shipped
# config's architecture (one xattn block fewer, another width) must show up here, on purpose.
EXACT_COUNTS = {
    "tiny": dict(frozen_lm=246_848, frozen_vision=75_042, trainable_xattn=98_820, trainable_resampler=108_928,
                 trainable_new_tokens=64, total=529_702),
    "ref_cpu": dict(frozen_lm=60_039_680, frozen_vision=11_019_264, trainable_xattn=24_133_648,
                    trainable_resampler=11_836_032, trainable_new_tokens=1_024, total=107_029_648),
    "3b": dict(frozen_lm=1_374_357_504, frozen_vision=435_286_116, trainable_xattn=1_157_824_560,
               trainable_resampler=193_631_232, trainable_new_tokens=2_048, total=3_161_101_460),
    "9b": dict(frozen_lm=7_094_276_096, frozen_vision=435_286_116, trainable_xattn=1_635_942_420,
               trainable_resampler=193_631_232, trainable_new_tokens=4_096, total=9_359_139_960),
    "80b": dict(frozen_lm=70_057_992_192, frozen_vision=435_286_116, trainable_xattn=9_966_059_544,
                trainable_resampler=193_631_232, trainable_new_tokens=8_192, total=80_652_977_276),
    "llama_clip": dict(frozen_lm=1_235_814_400, frozen_vision=303_179_776, trainable_xattn=192_970_760,
                       trainable_resampler=190_485_504, trainable_new_tokens=4_096, total=1_922_454_536),
    "llama7b_nfnet": dict(frozen_lm=6_738_415_616, frozen_vision=435_286_116, trainable_xattn=1_442_971_664,
                          trainable_resampler=193_631_232, trainable_new_tokens=16_384, total=8_810_321_012),
    "openflamingo_3b": dict(frozen_lm=1_311_027_200, frozen_vision=303_179_776, trainable_xattn=881_000_496,
                            trainable_resampler=63_019_008, trainable_new_tokens=6_144, total=2_558_232_624),
    "openflamingo_4b": dict(frozen_lm=2_775_070_720, frozen_vision=303_179_776, trainable_xattn=897_744_928,
                            trainable_resampler=63_019_008, trainable_new_tokens=15_360, total=4_039_029_792),
    "openflamingo_9b": dict(frozen_lm=6_648_651_776, frozen_vision=303_179_776, trainable_xattn=1_115_815_952,
                            trainable_resampler=63_019_008, trainable_new_tokens=12_288, total=8_130_678_800),
    "openflamingo_9b_v1": dict(frozen_lm=6_738_415_616, frozen_vision=303_179_776, trainable_xattn=1_115_815_952,
                               trainable_resampler=63_019_008, trainable_new_tokens=24_576, total=8_220_454_928),
}
PAPER_XATTN_BLOCKS = {"3b": 24, "9b": 10, "80b": 12}  # every layer of 24, every 4th of 40, every 7th of 80


@pytest.mark.parametrize("name", sorted(EXACT_COUNTS))
def test_exact_parameter_counts_of_every_shipped_config(name):
    cfg = FlamingoConfig.from_dict(load_config(name).model)
    counts = param_counts(cfg)
    assert {k: counts[k] for k in EXACT_COUNTS[name]} == EXACT_COUNTS[name]
    assert counts["total"] == counts["trainable"] + counts["frozen"] == sum(
        counts[k] for k in EXACT_COUNTS[name] if k != "total")
    if name in PAPER_XATTN_BLOCKS:
        assert cfg.num_xattn_blocks == PAPER_XATTN_BLOCKS[name]
        # One block fewer is caught: the xattn count is that many equal blocks.
        fewer = dataclasses.replace(cfg, decoder=dataclasses.replace(
            cfg.decoder, num_layers=cfg.decoder.num_layers - cfg.xattn.every))
        per_block = counts["trainable_xattn"] // cfg.num_xattn_blocks
        assert param_counts(fewer)["trainable_xattn"] == counts["trainable_xattn"] - per_block


# Configs on converted public backbones: the frozen parts have the published checkpoints' exact sizes.
PUBLIC = {
    "llama_clip": dict(frozen_lm=1_235_814_400,  # Llama-3.2-1B (tied embeddings)
                       frozen_vision=303_179_776),  # CLIP ViT-L/14's visual tower, no projection
    "llama7b_nfnet": dict(frozen_lm=6_738_415_616,  # Llama-2-7B
                          frozen_vision=435_286_116),  # NFNet-F6 with its final conv, no classifier
    "openflamingo_9b_v1": dict(frozen_lm=6_738_415_616,  # LLaMA-7B (untied)
                               frozen_vision=303_179_776),  # open_clip ViT-L/14's visual tower
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_backbone_configs_have_the_published_sizes(name):
    counts = param_counts(FlamingoConfig.from_dict(load_config(name).model))
    for column, exact in PUBLIC[name].items():
        assert counts[column] == exact, (column, counts[column])
    assert counts["trainable_new_tokens"] == load_config(name).model.num_new_tokens * load_config(
        name).model.decoder.dim * (
        1 if load_config(name).model.decoder.tie_embeddings else 2)


@pytest.mark.parametrize("name", ["tiny", "ref_cpu", "3b", "9b", "80b", "llama_clip", "llama7b_nfnet",
                                  "openflamingo_3b", "openflamingo_4b", "openflamingo_9b", "openflamingo_9b_v1"])
def test_shipped_configs_validate(name):
    FlamingoConfig.from_dict(load_config(name).model)


@pytest.mark.parametrize("name", ["tiny", "ref_cpu", "3b", "9b", "80b"])
def test_spike_guard_is_on_for_paper_runs_only(name):
    """Pod runs roll back loss spikes by themselves; the small configs (and tests) do not."""
    assert load_config(name).train.spike_guard.enabled == (name in TABLE5)


def tiny_dict():
    return load_config("tiny").model.to_dict()


@pytest.mark.parametrize("edit, field, fix", [
    (lambda d: d["decoder"].update(num_heads=3, num_kv_heads=2), "model.decoder.num_heads", "multiple"),
    (lambda d: d["xattn"].update(every=9), "model.xattn.every", "between 1 and"),
    (lambda d: d["xattn"].update(first_layer=4), "model.xattn.first_layer", "every - 1 as OpenFlamingo"),
    (lambda d: d["xattn"].update(media_association="of"), "model.xattn.media_association", "'openflamingo'"),
    (lambda d: d["resampler"].update(media_positions=-1), "model.resampler.media_positions", ">= 0"),
    (lambda d: d["vision"].update(encoder="resnet"), "model.vision.encoder", "'nfnet' or 'vit'"),
    (lambda d: d["vision"]["nfnet"].update(variant="F9"), "model.vision.nfnet.variant", "one of"),
    (lambda d: d["vision"]["nfnet"].update(variant="custom"), "model.vision.nfnet", "needs widths, depths"),
    (lambda d: d["vision"]["nfnet"].update(activation="relu"), "model.vision.nfnet.activation", "'gelu_exact'"),
    (lambda d: d["vision"]["nfnet"].update(ws_epsilon_mode="sqrt"), "model.vision.nfnet.ws_epsilon_mode", "'add'"),
    (lambda d: d["vision"].update(image_size=50), "model.vision.image_size", "multiple"),
    (lambda d: d["decoder"].update(positions="learned"), "model.decoder.positions", "one of"),
    (lambda d: d.update(dtype="fp8"), "model.dtype", "one of"),
    (lambda d: d.update(freeze_lm=False, frozen_param_dtype="bfloat16"), "model.freeze_lm",
     "--config.model.frozen_param_dtype=float32"),
    (lambda d: d["decoder"].update(n_layers=4), "model.decoder.n_layers", "valid fields"),
])
def test_impossible_config_names_the_field_and_the_fix(edit, field, fix):
    values = tiny_dict()
    edit(values)
    with pytest.raises(ConfigError) as error:
        FlamingoConfig.from_dict(values)
    assert f"`{field}`" in str(error.value)
    assert fix in str(error.value)


def test_vit_heads_must_divide_width():
    values = tiny_dict()
    values["vision"].update(encoder="vit", image_size=32)
    values["vision"]["vit"].update(width=30, num_heads=4, patch_size=8)
    with pytest.raises(ConfigError, match="model.vision.vit.width"):
        FlamingoConfig.from_dict(values)


def test_contrastive_paper_config_has_the_papers_numbers():
    """configs/contrastive_nfnet_f6.py: appendix B.1.3's recipe, validated as a whole run config."""
    from flamingo_jax.core.config import RunConfig

    config = load_config("contrastive_nfnet_f6")
    run = RunConfig.from_config(config)
    vision, text, contrastive, train = run.model.vision, run.contrastive.text, run.contrastive, run.train
    assert run.objective == "contrastive"
    assert (vision.encoder, vision.nfnet.variant, vision.image_size) == ("nfnet", "F6", 288)
    assert param_counts(run.model)["frozen_vision"] == 435_286_116  # NFNet-F6, as the Flamingo configs freeze it
    assert text.embed_dim == 1376 and contrastive.label_smoothing == 0.1
    assert (contrastive.vision_agc, contrastive.text_clip_norm) == (0.01, 10.0)
    assert (train.learning_rate, train.schedule, train.weight_decay, train.microbatches) == (1e-3, "linear", 0.0, 1)
    (pairs,) = run.data["datasets"]
    assert pairs["kind"] == "image_text" and pairs["batch_size"] * 128 == 16_384  # per host, 128 hosts of v4
