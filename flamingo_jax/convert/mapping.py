"""A family's parameter mapping, checked before anything is read, then applied tensor by tensor.

A `Table` lists one `Rule` per weight of ours: which source tensor(s) it comes
from and the layout change (`transforms.py`). A stacked weight (our leading
'layers' axis) names a source template with `{layer}` and the source layer
indices, in our layer order; their transformed tensors are stacked on axis 0.
Source tensors that are deliberately not converted (a classifier head, the text
tower of a CLIP model) match the table's `ignored` patterns; any other tensor
the rules do not use is an error, so nothing is dropped silently.

`plan` compares the table with the source's names and shapes and with our
model's abstract weights and reports every missing, unexpected or wrongly
shaped tensor at once; `produce` then yields our weights one at a time, so a
conversion holds about one (stacked) weight in memory, never the model twice.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from flamingo_jax.convert import transforms
from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.convert.sources import TensorSource

Keys = tuple[Any, ...]  # a path of dict keys into our pure dict (str, or int for nnx.List entries)
_SHOWN = 8  # names listed per kind of problem; the rest are counted


@dataclasses.dataclass(frozen=True)
class Rule:
    """One of our weights (a '/'-joined path in the component's pure dict) and where it comes from."""

    target: str
    source: str  # a source tensor name; with `layers`, a template with '{layer}'
    transform: transforms.Transform = transforms.as_is
    layers: tuple[int, ...] = ()  # stacked weight: the source layer index of each of our layers

    def source_names(self) -> list[str]:
        if not self.layers:
            return [self.source]
        return [self.source.format(layer=index) for index in self.layers]


def torch_layer_norm(target: str, source: str, layers: tuple[int, ...] | range = ()) -> list[Rule]:
    """torch LayerNorm `weight`, `bias` -> our `scale`, `bias` (same layout)."""
    return [Rule(f"{target}/scale", f"{source}.weight", layers=tuple(layers)),
            Rule(f"{target}/bias", f"{source}.bias", layers=tuple(layers))]


def torch_dense(target: str, source: str, layers: tuple[int, ...] | range = (), *,
                kernel: transforms.Transform = transforms.torch_linear,
                bias: transforms.Transform = transforms.as_is) -> list[Rule]:
    """torch Linear (or 1x1 conv) `weight`, `bias` -> our Dense `kernel`, `bias`."""
    return [Rule(f"{target}/kernel", f"{source}.weight", kernel, tuple(layers)),
            Rule(f"{target}/bias", f"{source}.bias", bias, tuple(layers))]


@dataclasses.dataclass(frozen=True)
class Table:
    """A family's rules for one architecture, and the source tensors it leaves out on purpose."""

    rules: tuple[Rule, ...]
    ignored: tuple[str, ...] = ()  # regular expressions, matched against whole tensor names
    description: str = ""  # the architecture read from the source, for error messages

    def is_ignored(self, name: str) -> bool:
        return any(re.fullmatch(pattern, name) for pattern in self.ignored)


@dataclasses.dataclass(frozen=True)
class Step:
    keys: Keys
    rule: Rule
    shape: tuple[int, ...]  # ours, including the stacked axis


def target_path(keys: Keys) -> str:
    return "/".join(str(key) for key in keys)


def flatten_target(tree: Mapping[Any, Any]) -> dict[str, tuple[Keys, Any]]:
    """Our pure dict of abstract arrays -> {'a/b/kernel': (keys, leaf)}."""
    flat = {}

    def visit(node, keys):
        if isinstance(node, Mapping):
            for key, child in node.items():
                visit(child, keys + (key,))
        else:
            flat[target_path(keys)] = (keys, node)

    visit(tree, ())
    return flat


@functools.lru_cache(maxsize=None)  # the layers of a stacked weight share one transform and shape
def _shape_after(transform: transforms.Transform, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `transform` makes of a source tensor of `shape` (abstractly: nothing is allocated)."""
    return tuple(jax.eval_shape(transform, jax.ShapeDtypeStruct(shape, np.float32)).shape)


def _listing(items: list[str]) -> str:
    shown = "\n".join(f"    {item}" for item in items[:_SHOWN])
    more = f"\n    ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return shown + more


def plan(table: Table, source: TensorSource, target: Mapping[Any, Any], *, fmt: str) -> list[Step]:
    """Checks `table` against the source and our abstract weights; returns the steps in target order.

    Raises one ConversionError listing every problem: weights of ours no rule
    makes, source tensors a rule needs that are missing, source tensors nothing
    uses (and not ignored), and tensors whose shape does not map to ours."""
    flat = flatten_target(target)
    rules = {rule.target: rule for rule in table.rules}
    if len(rules) != len(table.rules):
        raise ConversionError(f"the {fmt} table maps some weight twice; this is a bug in flamingo_jax/convert.")
    unmapped = sorted(set(flat) - set(rules))
    unknown_targets = sorted(set(rules) - set(flat))
    if unmapped or unknown_targets:
        raise ConversionError(
            f"the {fmt} table does not fit the encoder built from the source's architecture ({table.description}): "
            f"no rule for {unmapped[:_SHOWN]}, rules for weights it lacks {unknown_targets[:_SHOWN]}. This is a bug "
            "in flamingo_jax/convert; please report it with the source's tensor names.")

    names = set(source.names())
    used: set[str] = set()
    missing, misshaped, steps = [], [], []
    for path, (keys, leaf) in flat.items():
        rule = rules[path]
        want = tuple(leaf.shape[1:]) if rule.layers else tuple(leaf.shape)
        if rule.layers and leaf.shape[:1] != (len(rule.layers),):
            raise ConversionError(f"the {fmt} table stacks {len(rule.layers)} layers into our {path} of shape "
                                  f"{tuple(leaf.shape)}; this is a bug in flamingo_jax/convert.")
        for position, name in enumerate(rule.source_names()):
            layer = f" (layer {position} of {len(rule.layers)})" if rule.layers else ""
            used.add(name)
            if name not in names:
                missing.append(f"{name}: for our {path}{layer}, shape {want}")
                continue
            got = source.shape(name)
            try:
                mapped = _shape_after(rule.transform, got)
            except Exception as error:  # a reshape that cannot apply to this shape
                misshaped.append(f"{name} has shape {got}, which {rule.transform.__name__} cannot turn into our "
                                 f"{path}{layer} of shape {want} ({type(error).__name__}: {error})")
                continue
            if mapped != want:
                misshaped.append(f"{name} has shape {got}, which becomes {mapped}; our {path}{layer} needs {want}")
        steps.append(Step(keys, rule, tuple(leaf.shape)))
    unexpected = sorted(name for name in names - used if not table.is_ignored(name))

    problems = []
    if missing:
        problems.append(f"  missing tensors ({len(missing)}):\n{_listing(missing)}")
    if unexpected:
        shapes = [f"{name} {source.shape(name)}" for name in unexpected]
        problems.append(f"  unexpected tensors ({len(unexpected)}), which this architecture has no place for:\n"
                        f"{_listing(shapes)}")
    if misshaped:
        problems.append(f"  wrongly shaped tensors ({len(misshaped)}):\n{_listing(misshaped)}")
    if problems:
        raise ConversionError(
            f"{source.path} does not match --format={fmt} with the architecture read from it "
            f"({table.description}):\n" + "\n".join(problems) + "\nNothing was written. Check that the file is a "
            f"complete {fmt} checkpoint of this architecture (unexpected tensors often mean a variant this converter "
            "does not support, e.g. layer scale or an attention pooler).")
    return steps


def produce(steps: list[Step], source: TensorSource, dtype: Any = None) -> Iterator[tuple[Keys, np.ndarray]]:
    """Our weights one at a time, in `dtype` (None: each source tensor's own dtype)."""
    for step in steps:
        rule = step.rule
        if not rule.layers:
            array = np.asarray(rule.transform(source.read(rule.source)))
            # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them [1]).
            yield step.keys, np.require(array, dtype=dtype or array.dtype, requirements="C")
            continue
        out = None
        for position, name in enumerate(rule.source_names()):
            layer = np.asarray(rule.transform(source.read(name)))
            if out is None:  # one buffer for the stacked weight, filled layer by layer
                out = np.empty(step.shape, dtype=dtype or layer.dtype)
            out[position] = layer
        yield step.keys, out
