"""What every converter shares: lazy tensor sources and the atomic, bounded-memory backbone writer."""

from __future__ import annotations

import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flamingo_jax.convert import mapping, sources, transforms, writer
from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.core import backbones


def bits(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).view(np.uint16)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_bf16_tensors_read_bit_exact(tmp_path, suffix):
    tensor = torch.randn(3, 5).to(torch.bfloat16)
    path = str(tmp_path / f"w{suffix}")
    if suffix == ".safetensors":
        save_file({"w": tensor}, path)
    else:
        torch.save({"w": tensor}, path)
    with sources.open_source(path) as source:
        assert source.names() == ["w"] and source.shape("w") == (3, 5)
        array = source.read("w")
    assert array.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bits(array), tensor.view(torch.int16).numpy().view(np.uint16))


def test_torch_training_checkpoint_is_unwrapped(tmp_path):
    """A training checkpoint: the 'state_dict' entry, DataParallel's 'module.' prefix dropped."""
    torch.save({"epoch": 3, "state_dict": {"module.a.weight": torch.ones(2), "module.b": torch.zeros(1, 2)}},
               tmp_path / "epoch_3.pt")
    with sources.open_source(str(tmp_path)) as source:  # a directory holding a single weights file
        assert source.names() == ["a.weight", "b"]
        assert source.shape("b") == (1, 2)


def test_a_directory_with_several_weight_files_is_ambiguous(tmp_path):
    for name in ("a.pt", "b.pt"):
        torch.save({"x": torch.ones(1)}, tmp_path / name)
    with pytest.raises(ConversionError, match=r"several weight files \['a.pt', 'b.pt'\]; pass the one"):
        sources.open_source(str(tmp_path))


def test_a_shard_the_index_names_must_exist(tmp_path):
    save_file({"a": torch.ones(1)}, str(tmp_path / "part-1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}')
    with pytest.raises(ConversionError, match="part-2.safetensors is missing"):
        sources.open_source(str(tmp_path))


# ---------------------------------------------------------------- writer

TREE = {  # int keys (nnx.List entries), a 0-d weight and bf16, as real encoders have
    "stages": {0: {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4), "gain": np.asarray(np.float32(2.5))},
               1: {"kernel": np.ones((2, 3), ml_dtypes.bfloat16)}},
    "bias": np.linspace(0, 1, 5, dtype=np.float32),
}


def leaves(tree):
    return [(keys, leaf) for _, (keys, leaf) in mapping.flatten_target(tree).items()]


def abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def restore(path, tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return backbones.restore(path, abstract(tree), jax.tree.map(lambda _: device, tree))


@pytest.mark.parametrize("buffer_bytes, saves", [(0, 4), (60, 2), (1 << 20, 1)])
def test_writer_round_trips_through_backbone_restore_in_bounded_groups(tmp_path, monkeypatch, buffer_bytes, saves):
    """A group is saved once it holds `buffer_bytes` (so 0 saves each weight alone, before the
    next is read), and the result is what core/backbones.py restores, record beside it."""
    from orbax.checkpoint.experimental.v1 import partial

    calls = []
    save = partial.save
    monkeypatch.setattr(partial, "save", lambda path, group: (calls.append(group), save(path, group))[1])
    out = writer.write_backbone(str(tmp_path / "backbone"), iter(leaves(TREE)), abstract(TREE), {"note": "x"},
                                buffer_bytes=buffer_bytes)
    assert len(calls) == saves
    restored = mapping.flatten_target(restore(out, TREE))
    for path, (_, want) in mapping.flatten_target(TREE).items():
        got = restored[path][1]
        assert got.shape == want.shape and got.dtype == want.dtype, path
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert writer.read_record(out) == {"note": "x"}
    assert sorted(os.listdir(tmp_path)) == ["backbone"]  # no staging directory left


def failing(after: int):
    for index, item in enumerate(leaves(TREE)):
        if index == after:
            raise ConversionError("source went away")
        yield item


def test_a_failed_write_leaves_no_output_and_keeps_what_it_would_replace(tmp_path):
    out = tmp_path / "backbone"
    with pytest.raises(ConversionError, match="source went away"):
        writer.write_backbone(str(out), failing(after=2), abstract(TREE), {}, buffer_bytes=0)
    assert os.listdir(tmp_path) == []
    first = writer.write_backbone(str(out), iter(leaves(TREE)), abstract(TREE), {"run": 1})
    with pytest.raises(ConversionError, match="source went away"):
        writer.write_backbone(str(out), failing(after=3), abstract(TREE), {"run": 2}, overwrite=True, buffer_bytes=0)
    assert writer.read_record(first) == {"run": 1}  # the old checkpoint is intact
    assert sorted(os.listdir(tmp_path)) == ["backbone"]


def test_written_tree_is_verified_against_the_encoder(tmp_path):
    wrong = {**TREE, "bias": np.zeros(6, np.float32)}
    with pytest.raises(ConversionError, match="differs from the encoder's weights"):
        writer.write_backbone(str(tmp_path / "backbone"), iter(leaves(wrong)), abstract(TREE), {})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- transforms


def test_fused_qkv_split_and_head_reshapes_invert_torch_layouts():
    """q = x @ in_proj[:W].T per head equals our einsum with the transformed kernel; the output
    projection likewise."""
    rng = np.random.default_rng(0)
    width, heads = 8, 2
    fused = rng.standard_normal((3 * width, width)).astype(np.float32)  # torch in_proj_weight [3W, W]
    x = rng.standard_normal((5, width)).astype(np.float32)
    for part in range(3):
        kernel = transforms.compose(transforms.split_fused(part), transforms.heads_out(heads))(fused)  # [W, H, Dh]
        want = (x @ fused[part * width:(part + 1) * width].T).reshape(5, heads, width // heads)
        np.testing.assert_allclose(np.einsum("tw,whd->thd", x, kernel), want, rtol=1e-6, atol=1e-6)
    out_proj = rng.standard_normal((width, width)).astype(np.float32)  # torch [W_out, H*Dh]
    per_head = x.reshape(5, heads, width // heads)
    np.testing.assert_allclose(np.einsum("thd,hdw->tw", per_head, transforms.heads_in(heads)(out_proj)),
                               x @ out_proj.T, rtol=1e-6, atol=1e-6)


def test_compress_switches_orbax_zstd_chunks(tmp_path):
    tree = {"zeros": np.zeros((256, 1024), np.float32)}  # 1 MiB that zstd shrinks to almost nothing

    def written(compress: bool) -> int:
        out = writer.write_backbone(str(tmp_path / f"c{compress}"), iter(leaves(tree)), abstract(tree), {},
                                    compress=compress)
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(out) for f in files)

    assert written(False) > 1 << 20 > 10 * written(True)
