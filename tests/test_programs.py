"""training/programs.py: a second Trainer of the same run in a process reuses the first's jitted
programs, and anything its programs are built from (the config, the devices, the tokenizer
file) changing gives new ones. No compiles here; test_training's SIGTERM test checks that a
resumed run with reused programs equals an uninterrupted one."""

import types

import jax
import pytest

from flamingo_jax.core import sharding
from flamingo_jax.training import programs

from helpers import load_config


@pytest.fixture
def empty_programs(monkeypatch):
    monkeypatch.setattr(programs, "_programs", programs.collections.OrderedDict())


def test_the_run_key_changes_with_the_config_the_devices_and_the_tokenizer_file():
    config, one = load_config("tiny"), sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    tokenizer = types.SimpleNamespace(digest="abc")
    key = programs.run_key(config, one, tokenizer)
    assert programs.run_key(load_config("tiny"), one, types.SimpleNamespace(digest="abc")) == key
    changed = load_config("tiny")
    changed.train.learning_rate *= 2
    assert programs.run_key(changed, one, tokenizer) != key
    assert programs.run_key(config, one, types.SimpleNamespace(digest="abd")) != key
    assert programs.run_key(config, one, None) != key
    if jax.device_count() > 1:
        other = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[1:2])
        assert programs.run_key(config, other, tokenizer) != key
    # A tokenizer that cannot say which file it read: its run's programs are never kept.
    assert programs.run_key(config, one, types.SimpleNamespace()) is None


def test_reuse_builds_once_per_key_keeps_the_newest_and_never_keeps_an_unknown_run(empty_programs):
    built = []

    def build(name):
        return lambda: built.append(name) or name

    assert programs.reuse("run", ("step",), build("a")) == "a"
    assert programs.reuse("run", ("step",), build("b")) == "a" and built == ["a"]
    assert programs.reuse("run", ("init",), build("c")) == "c"
    for i in range(programs.KEPT):
        programs.reuse(f"other{i}", ("step",), build(i))
    assert programs.reuse("run", ("step",), build("d")) == "d"  # the oldest were dropped
    assert programs.reuse(None, ("step",), build("e")) == "e" and programs.reuse(None, ("step",), build("f")) == "f"
    assert built[-3:] == ["d", "e", "f"]
