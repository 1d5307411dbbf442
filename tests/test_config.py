"""Configs: impossible values fail early and clearly; paper parameter counts."""


import pytest

from flamingo_jax.models.config import ConfigError, FlamingoConfig
from flamingo_jax.models.summary import param_counts

from helpers import load_config

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


@pytest.mark.parametrize("name", ["tiny", "ref_cpu", "3b", "9b", "80b", "openflamingo_3b", "openflamingo_4b",
                                  "openflamingo_9b"])
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
