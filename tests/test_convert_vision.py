"""`python -m flamingo_jax.convert vision`: public vision weights -> our encoder, with numerical parity.

Each family's reference model is built in its own library with random weights
(every parameter perturbed, so no LayerNorm is the identity and no skip gain is
0) and a tiny config, saved as its users have it, converted with the CLI,
restored through core/backbones.py into our encoder, and run on the same
images (NHWC for us, NCHW for torch, from one array).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import numpy as np
import pytest

# transformers would otherwise import TensorFlow (installed for tf.data) for its TF models: 5 s.
os.environ.setdefault("USE_TF", "0")
import jax
import jax.numpy as jnp
import torch
import torchvision_cpu  # noqa: E402, F401  (before transformers / open_clip / timm import torchvision)
from flax import nnx

from flamingo_jax.convert import mapping, vision, writer
from flamingo_jax.convert.families import Options
from flamingo_jax.convert.sources import TensorSource
from flamingo_jax.core import backbones
from flamingo_jax.models.config import FlamingoConfig
from flamingo_jax.models.flamingo import build_vision_encoder

from helpers import assert_nothing_written, run_convert

TOLERANCE = 1e-4  # max abs, fp32


def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturbs every parameter (init leaves LayerNorms at 1/0 and NFNet skip gains at 0,
    which would hide a wrong mapping of them); skip gains go to [0.5, 1.5]."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("skipinit_gain"):
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            else:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def convert(*flags: str) -> int:
    """`python -m flamingo_jax.convert vision ...` in-process: its exit status."""
    return run_convert("vision", *flags)


def images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)  # [B, H, W, 3]


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def vision_config(record: dict, image_size: int | None = None) -> FlamingoConfig:
    """A model config with the record's `model.vision` fields (dotted paths) over the defaults."""
    vision = dataclasses.asdict(FlamingoConfig())["vision"]
    for path, value in record["model"]["vision"].items():
        *parents, leaf = path.split(".")
        node = vision
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    if image_size:
        vision["image_size"] = image_size
    return FlamingoConfig.from_dict({"vision": vision})


def restored_encoder(out: str, image_size: int | None = None, *, dtype=jnp.float32) -> nnx.Module:
    """Our encoder for the converted checkpoint, its weights read by core/backbones.restore."""
    cfg = vision_config(writer.read_record(out), image_size)
    abstract = nnx.eval_shape(lambda: build_vision_encoder(cfg, dtype=jnp.float32, param_dtype=dtype,
                                                           rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    nnx.replace_by_pure_dict(state, backbones.restore(out, pure, jax.tree.map(lambda _: device, pure)))
    return nnx.merge(graphdef, state)


def weights(encoder: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(encoder))


def run(encoder: nnx.Module, x: np.ndarray) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, x: m(x))(encoder, jnp.asarray(x)))


# ---------------------------------------------------------------- reference models (one per family)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A tiny CLIPVisionModel saved with save_pretrained as sharded safetensors, and its conversion."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, hidden_act="quick_gelu")
    model = randomise_(CLIPVisionModel(config), seed=1)
    root = tmp_path_factory.mktemp("hf_clip")
    model.save_pretrained(root / "src", max_shard_size="20KB")  # several shards + model.safetensors.index.json
    assert (root / "src" / "model.safetensors.index.json").exists()
    out = str(root / "converted")
    assert convert(f"--from={root / 'src'}", "--format=hf_clip", f"--out={out}", "--buffer_mb=0") == 0
    return model, root, out


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory):
    """A tiny open_clip CLIP (erf GELU) saved as a torch state dict `.pt`, and its conversion."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=16, quick_gelu=False,
        vision_cfg=dict(layers=2, width=32, head_width=8, mlp_ratio=3.0, patch_size=8, image_size=32),
        text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
    model = randomise_(model, seed=2)
    root = tmp_path_factory.mktemp("open_clip")
    torch.save(model.state_dict(), root / "clip.pt")
    out = str(root / "converted")
    assert convert(f"--from={root / 'clip.pt'}", "--format=open_clip", f"--out={out}", "--num_heads=4",
                   "--activation=gelu_exact") == 0
    return model, root, out


@pytest.fixture(scope="module")
def timm_nfnet(tmp_path_factory):
    """timm's dm_nfnet_f0 at toy widths and depths, saved as safetensors, and its conversion."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("dm_nfnet_f0", pretrained=False, num_classes=10, channels=(16, 32, 64, 64),
                              depths=(1, 2, 3, 2), stem_chs=16, group_size=8, num_features=128)
    model = randomise_(model, seed=3)
    root = tmp_path_factory.mktemp("timm_nfnet")
    save_file(model.state_dict(), str(root / "model.safetensors"))
    out = str(root / "converted")
    assert convert(f"--from={root / 'model.safetensors'}", "--format=timm_nfnet", f"--out={out}",
                   "--image_size=64") == 0
    return model, root, out


# ---------------------------------------------------------------- parity


def test_hf_clip_patch_tokens_match_the_reference(hf_clip):
    model, _, out = hf_clip
    x = images(32)
    with torch.no_grad():
        reference = model(pixel_values=nchw(x)).last_hidden_state[:, 1:].numpy()  # [B, N, W], class token dropped
    ours = run(restored_encoder(out), x)
    assert ours.shape == reference.shape == (2, 16, 32)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=TOLERANCE)


def test_open_clip_patch_tokens_match_the_reference(open_clip_model):
    model, _, out = open_clip_model
    x = images(32, seed=1)
    model.visual.output_tokens = True  # as OpenFlamingo sets it
    with torch.no_grad():
        _, reference = model.visual(nchw(x))
    reference = reference.numpy()
    ours = run(restored_encoder(out), x)
    assert ours.shape == reference.shape == (2, 16, 32)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=TOLERANCE)


def test_open_clip_tower_saved_alone_converts_to_the_same_weights(open_clip_model, tmp_path):
    """The `visual.` tower's own state dict (no prefix, no text tower) gives the same checkpoint."""
    model, _, out = open_clip_model
    torch.save(model.visual.state_dict(), tmp_path / "visual.pt")
    alone = str(tmp_path / "converted")
    assert convert(f"--from={tmp_path / 'visual.pt'}", "--format=open_clip", f"--out={alone}", "--num_heads=4",
                   "--activation=gelu_exact") == 0
    jax.tree.map(np.testing.assert_array_equal, weights(restored_encoder(alone)), weights(restored_encoder(out)))


def test_hf_clip_model_with_its_text_tower_converts_the_vision_tower(tmp_path):
    """A whole CLIPModel: config.json's nested vision_config, text tower and projections ignored."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),  # hidden_act: CLIP's default quick_gelu, not written
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=8), projection_dim=8)
    model = randomise_(CLIPModel(config), seed=4)
    model.save_pretrained(tmp_path / "src")
    out = str(tmp_path / "converted")
    assert convert(f"--from={tmp_path / 'src'}", "--format=hf_clip", f"--out={out}") == 0
    record = writer.read_record(out)
    assert any(name.startswith("text_model.") for name in record["ignored_tensors"])
    x = images(32, seed=3)
    with torch.no_grad():
        reference = model.vision_model(pixel_values=nchw(x)).last_hidden_state[:, 1:].numpy()
    np.testing.assert_allclose(run(restored_encoder(out), x), reference, rtol=0, atol=TOLERANCE)


def test_dtype_flag_writes_bfloat16(hf_clip, tmp_path):
    model, root, _ = hf_clip
    out = str(tmp_path / "converted")
    assert convert(f"--from={root / 'src'}", "--format=hf_clip", f"--out={out}", "--dtype=bfloat16") == 0
    stored = weights(restored_encoder(out, dtype=jnp.bfloat16))
    assert {leaf.dtype for leaf in jax.tree.leaves(stored)} == {jnp.dtype(jnp.bfloat16)}
    want = model.state_dict()["vision_model.pre_layrnorm.weight"].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(stored["ln_pre"]["scale"], np.float32), want)


def test_timm_nfnet_final_grid_matches_the_reference(timm_nfnet):
    model, _, out = timm_nfnet
    record = writer.read_record(out)
    assert record["model"]["vision"]["nfnet.variant"] == "custom"  # toy widths: spelled out field by field
    x = images(64, seed=2)
    with torch.no_grad():
        grid = model.forward_features(nchw(x)).numpy()  # [B, C, h, w], after final conv and activation
    reference = grid.transpose(0, 2, 3, 1).reshape(2, -1, grid.shape[1])  # [B, h*w, C]
    ours = run(restored_encoder(out), x)
    assert ours.shape == reference.shape == (2, 4, 128)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=TOLERANCE)


# ---------------------------------------------------------------- published sizes, shapes only


class ShapeSource(TensorSource):
    """A source of names and shapes only (from a model built on torch's meta device): plan() needs no data."""

    def __init__(self, module: torch.nn.Module, config: dict | None = None):
        super().__init__("meta", config)
        self._shapes = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}

    def names(self):
        return sorted(self._shapes)

    def shape(self, name):
        return self._shapes[name]

    def read(self, name):
        raise AssertionError("plan() must not read data")


def published(name: str) -> tuple[str, ShapeSource]:
    """(format, the published architecture's tensor shapes), without allocating it."""
    with torch.device("meta"):
        if name.startswith("dm_nfnet"):
            import timm

            return "timm_nfnet", ShapeSource(timm.create_model(name, pretrained=False))
        if name == "open_clip ViT-L-14":  # heads and activation from open_clip_config.json, as on the hub
            import open_clip

            model_cfg = {**open_clip.get_model_config("ViT-L-14"), "quick_gelu": True}
            source = ShapeSource(open_clip.model.CLIP(**model_cfg), {"open_clip_config.json": {"model_cfg": model_cfg}})
            return "open_clip", source
        from transformers import CLIPVisionConfig, CLIPVisionModel

        model = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                 num_attention_heads=16, image_size=224, patch_size=14))
        return "hf_clip", ShapeSource(model, {"config.json": model.config.to_diff_dict()})


@pytest.mark.parametrize("name, expected", [
    ("dm_nfnet_f0", "NFNet-F0: "), ("dm_nfnet_f6", "NFNet-F6: "),
    ("open_clip ViT-L-14", "ViT width 1024, 24 layers, 16 heads, patch 14, 224 px, MLP 4096 (quick_gelu)"),
    ("hf_clip ViT-L/14", "ViT width 1024, 24 layers, 16 heads, patch 14, 224 px, MLP 4096 (quick_gelu)"),
])
def test_published_architectures_map_completely(name, expected):
    """Full-size checkpoints' names and shapes (built on the meta device: no memory) are read as the
    published variant and map onto our encoder with nothing missing, unexpected or misshaped."""
    fmt, source = published(name)
    arch = vision.read_architecture(source, fmt, Options())
    target = vision.encoder_weights(arch.vision)
    steps = mapping.plan(arch.table, source, target, fmt=fmt)  # raises on any mismatch
    assert arch.table.description.startswith(expected)
    assert len(steps) == len(mapping.flatten_target(target))
    if fmt == "timm_nfnet":
        assert arch.vision.nfnet.variant == name[-2:].upper()  # a published variant, by name


# ---------------------------------------------------------------- the converted checkpoint in a Flamingo config


def parse_config(overrides: list[str], monkeypatch) -> object:
    """configs/tiny.py with `overrides` parsed as the training CLI parses them."""
    from absl import flags
    from ml_collections import config_flags

    from helpers import ROOT

    argv = ["train", f"--config={ROOT / 'configs' / 'tiny.py'}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    values(argv)
    return values.config


def spot_checks(family: str, state: dict) -> list[tuple[tuple, np.ndarray]]:
    """(path in our encoder's weights, the source tensor in our layout) for a few weights."""
    if family == "hf_clip":
        return [(("positional_embedding",), state["vision_model.embeddings.position_embedding.weight"].numpy()),
                (("blocks", "query", "kernel", 1),
                 state["vision_model.encoder.layers.1.self_attn.q_proj.weight"].numpy().T.reshape(32, 4, 8))]
    hwio = lambda name: state[name].numpy().transpose(2, 3, 1, 0)  # noqa: E731
    return [(("stem_conv0", "kernel"), hwio("stem.conv1.weight")),
            (("stages", 2, "blocks", "conv1", "kernel", 1), hwio("stages.2.2.conv2.weight"))]


@pytest.mark.parametrize("family, frozen_dtype", [("hf_clip", "float32"), ("hf_clip", "bfloat16"),
                                                  ("timm_nfnet", "float32")])
def test_converted_checkpoint_is_accepted_by_a_flamingo_config(family, frozen_dtype, request, monkeypatch):
    """The printed overrides (tuples included, for a custom NFNet) make configs/tiny.py build this
    encoder; `config.backbones.vision` then restores the checkpoint into ModelParts' frozen
    weights, cast to the config's frozen dtype."""
    from flamingo_jax.core import sharding
    from flamingo_jax.core.parts import ModelParts

    model, _, out = request.getfixturevalue(family)
    overrides = writer.read_record(out)["overrides"] + [f"--config.model.frozen_param_dtype={frozen_dtype}"]
    config = parse_config(overrides, monkeypatch)
    assert config.backbones.vision == out
    parts = ModelParts.flamingo(FlamingoConfig.from_dict(config.model))
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    _, frozen_shardings = sharding.weight_shardings(parts, mesh, sharding.rules_from_config(config.get("mesh_rules")))
    _, abstract_frozen = parts.abstract()
    paths = backbones.check_paths(config.backbones)
    assert paths == {"vision": out}
    frozen = backbones.load_into({}, abstract_frozen, frozen_shardings, paths)
    vision = frozen["vision_encoder"]
    assert jax.tree.structure(vision) == jax.tree.structure(abstract_frozen["vision_encoder"])
    assert {leaf.dtype for leaf in jax.tree.leaves(vision)} == {jnp.dtype(frozen_dtype)}
    cast = lambda a: np.asarray(jnp.asarray(a, frozen_dtype), np.float32)  # noqa: E731
    for path, want in spot_checks(family, model.state_dict()):
        got = vision
        for key in path:
            got = got[key]
        np.testing.assert_array_equal(np.asarray(got, np.float32), cast(want))


# ---------------------------------------------------------------- bad input: a clear error, nothing written


def hf_variant(hf_clip, tmp_path, edit) -> str:
    """The HF reference saved again as one safetensors file after `edit(tensors)`."""
    from safetensors.torch import save_file

    model, root, _ = hf_clip
    tensors = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    edit(tensors)
    os.makedirs(tmp_path / "src")
    shutil.copy(root / "src" / "config.json", tmp_path / "src" / "config.json")
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    return str(tmp_path / "src")


LAYER_1 = "vision_model.encoder.layers.1"
BAD_TENSORS = {
    "missing": (lambda t: t.pop(f"{LAYER_1}.mlp.fc2.bias"),
                ["missing tensors (1)", f"{LAYER_1}.mlp.fc2.bias", "blocks/mlp/wo/bias (layer 1 of 2)"]),
    "extra": (lambda t: t.update({f"{LAYER_1}.self_attn.extra.weight": torch.zeros(3, 4)}),
              ["unexpected tensors (1)", f"{LAYER_1}.self_attn.extra.weight (3, 4)"]),
    "wrong shape": (lambda t: t.update({"vision_model.pre_layrnorm.weight": torch.ones(33)}),
                    ["wrongly shaped tensors (1)", "vision_model.pre_layrnorm.weight has shape (33,)",
                     "ln_pre/scale needs (32,)"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensors_are_named_and_nothing_is_written(hf_clip, tmp_path, capsys, case):
    edit, expected = BAD_TENSORS[case]
    source = hf_variant(hf_clip, tmp_path, edit)
    out = str(tmp_path / "converted")
    assert convert(f"--from={source}", "--format=hf_clip", f"--out={out}") == 1
    message = capsys.readouterr().err
    for fragment in expected + ["Nothing was written"]:
        assert fragment in message, (fragment, message)
    assert_nothing_written(out)


def test_unknown_format_is_refused(hf_clip, tmp_path, capsys):
    out = str(tmp_path / "converted")
    assert convert(f"--from={hf_clip[1] / 'src'}", "--format=keras", f"--out={out}") == 2
    assert "--format=keras: value should be one of <hf_clip|open_clip|timm_nfnet>" in capsys.readouterr().err
    assert_nothing_written(out)


def test_wrong_family_is_an_unknown_architecture_with_a_hint(timm_nfnet, tmp_path, capsys):
    out = str(tmp_path / "converted")
    assert convert(f"--from={timm_nfnet[1] / 'model.safetensors'}", "--format=hf_clip", f"--out={out}") == 1
    message = capsys.readouterr().err
    assert "is not a checkpoint of --format=hf_clip (unknown architecture)" in message
    assert "It looks like --format=timm_nfnet" in message
    assert_nothing_written(out)


def test_unknown_hf_model_type_is_refused(hf_clip, tmp_path, capsys):
    source = hf_variant(hf_clip, tmp_path, lambda tensors: None)
    config_path = os.path.join(source, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "model_type": "siglip_vision_model"}, f)
    out = str(tmp_path / "converted")
    assert convert(f"--from={source}", "--format=hf_clip", f"--out={out}") == 1
    assert "unknown architecture: config.json has model_type 'siglip_vision_model'" in capsys.readouterr().err
    assert_nothing_written(out)


def test_open_clip_without_a_recorded_activation_needs_the_flag(open_clip_model, tmp_path, capsys):
    out = str(tmp_path / "converted")
    assert convert(f"--from={open_clip_model[1] / 'clip.pt'}", "--format=open_clip", f"--out={out}",
                   "--num_heads=4") == 1
    message = capsys.readouterr().err
    assert "does not record the activation" in message and "--activation=quick_gelu" in message
    assert_nothing_written(out)


def test_existing_output_is_refused_unless_overwrite(hf_clip, tmp_path, capsys):
    source = str(hf_clip[1] / "src")
    out = tmp_path / "converted"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert(f"--from={source}", "--format=hf_clip", f"--out={out}") == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    assert convert(f"--from={source}", "--format=hf_clip", f"--out={out}", "--overwrite") == 0
    assert "keep.txt" not in os.listdir(out)
    assert writer.read_record(str(out))["format"] == "hf_clip"
    assert not [entry for entry in os.listdir(tmp_path) if ".converting-" in entry]


def test_pickled_code_is_refused_without_running_it(tmp_path, capsys):
    """A .pt whose unpickling would run a command: torch.load(weights_only=True) refuses it."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"visual.conv1.weight": Payload()}, tmp_path / "evil.pt")
    out = str(tmp_path / "converted")
    assert convert(f"--from={tmp_path / 'evil.pt'}", "--format=open_clip", f"--out={out}") == 1
    assert "refused because unpickling them could run arbitrary code" in capsys.readouterr().err
    assert not marker.exists()
    assert_nothing_written(out)
