"""timm's `dm_nfnet_f0` ... `dm_nfnet_f6` (DeepMind's ImageNet NFNets as timm ships them) -> models/nfnet.py.

    stem.conv{1..4}                       stem_conv{0..3}
    stages.S.0.*                          stages/S/transition/*      (block 0 of each stage)
    stages.S.B.*, B >= 1                  stages/S/blocks/*          (stacked, our layer B-1)
        conv1 / conv2 / conv2b / conv3        conv0 / conv1 / conv1b / conv2
        downsample.conv                       conv_shortcut
        attn_last.fc1 / fc2                   se/fc0 / se/fc1        (1x1 convs as Dense)
        skipinit_gain                         skip_gain
    final_conv                            final_conv
    head.fc                               (ignored: the ImageNet classifier)

A ScaledStdConv2d's `weight` [out, in/g, kh, kw] becomes our `kernel` [kh, kw,
in/g, out], its `gain` [out, 1, 1, 1] our `gain` [out]. timm's port computes two
things differently from DeepMind's code, and the converted config says so: the
erf GELU (`activation='gelu_exact'`) and epsilon 1e-5 added to the kernel
variance (`ws_epsilon_mode='add'`); its 'SAME' padding, SE gain of 2 and
alpha/beta schedule are ours. The architecture is read from the tensor shapes:
a published F-variant by name, any other shape as `variant='custom'`.
"""

from __future__ import annotations

import re

from flamingo_jax.convert import transforms as t
from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.convert.families import IMAGENET_MEAN, IMAGENET_STD, Architecture, Options, layer_indices
from flamingo_jax.convert.mapping import Rule, Table, torch_dense
from flamingo_jax.convert.sources import TensorSource
from flamingo_jax.models.config import NFNET_VARIANTS, NFNetConfig, VisionConfig

FORMAT = "timm_nfnet"
SIGNATURE = "timm NFNets have stem.conv1.weight and stages.<s>.<b>.conv1.weight tensors"
TIMM_NUMERICS = dict(activation="gelu_exact", ws_epsilon=1e-5, ws_epsilon_mode="add")
# ScaledStdConv2d -> WSConv2D; timm's block convs are numbered one higher than ours.
BLOCK_CONVS = {"conv0": "conv1", "conv1": "conv2", "conv1b": "conv2b", "conv2": "conv3"}


def looks_like(names: list[str]) -> bool:
    return "stem.conv1.weight" in names and any(re.fullmatch(r"stages\.\d+\.\d+\.conv1\.weight", n) for n in names)


def ws_conv(target: str, source: str, layers: tuple[int, ...] | range = ()) -> list[Rule]:
    """timm ScaledStdConv2d(Same) -> our WSConv2D."""
    layers = tuple(layers)
    return [Rule(f"{target}/kernel", f"{source}.weight", t.torch_conv, layers),
            Rule(f"{target}/gain", f"{source}.gain", t.per_channel, layers),
            Rule(f"{target}/bias", f"{source}.bias", t.as_is, layers)]


def block_rules(target: str, source: str, *, shortcut: bool, layers: tuple[int, ...] | range = ()) -> list[Rule]:
    """One NF block, or (with `layers` and '{layer}' in `source`) a stack of them."""
    rules = []
    for ours, theirs in BLOCK_CONVS.items():
        rules += ws_conv(f"{target}/{ours}", f"{source}.{theirs}", layers)
    if shortcut:
        rules += ws_conv(f"{target}/conv_shortcut", f"{source}.downsample.conv", layers)
    for ours, theirs in (("fc0", "fc1"), ("fc1", "fc2")):
        rules += torch_dense(f"{target}/se/{ours}", f"{source}.attn_last.{theirs}", layers,
                             kernel=t.torch_pointwise_conv_as_linear)
    rules.append(Rule(f"{target}/skip_gain", f"{source}.skipinit_gain", t.as_is, tuple(layers)))
    return rules


def table(nfnet: NFNetConfig, widths: tuple[int, ...], depths: tuple[int, ...], stem_width: int,
          description: str) -> Table:
    rules = []
    for index in range(4):
        rules += ws_conv(f"stem_conv{index}", f"stem.conv{index + 1}")
    in_ch = stem_width
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        stride = 1 if stage == 0 else 2
        # A shortcut conv wherever the shape changes, in timm's blocks as in ours.
        rules += block_rules(f"stages/{stage}/transition", f"stages.{stage}.0", shortcut=stride > 1 or in_ch != width)
        if depth > 1:
            rules += block_rules(f"stages/{stage}/blocks", f"stages.{stage}.{{layer}}", shortcut=False,
                                 layers=range(1, depth))
        in_ch = width
    if nfnet.final_conv:
        rules += ws_conv("final_conv", "final_conv")
    return Table(tuple(rules), ignored=(r"head\.fc\.(weight|bias)",), description=description)


def read_architecture(source: TensorSource, options: Options) -> Architecture:
    names, path = source.names(), source.path
    architecture = source.config.get("config.json", {}).get("architecture")
    if architecture and not str(architecture).startswith("dm_nfnet"):
        raise ConversionError(
            f"{path}: unknown architecture {architecture!r} (config.json). timm_nfnet converts DeepMind's NFNets "
            "(dm_nfnet_f0 ... dm_nfnet_f6); timm's own nfnet_*/eca_nfnet_* differ in padding, activation and "
            "skip-init and have no counterpart here.")
    if "stages.0.0.skipinit_gain" not in names:
        raise ConversionError(
            f"{path}: no stages.0.0.skipinit_gain, so this is not one of DeepMind's NFNets (unknown architecture). "
            "timm's nfnet_*/eca_nfnet_*/nf_resnet* variants are not supported; convert a dm_nfnet_f* checkpoint.")
    stems = {int(m.group(1)) for n in names if (m := re.fullmatch(r"stem\.conv(\d+)\.weight", n))}
    if stems != {1, 2, 3, 4}:
        raise ConversionError(f"{path}: unknown architecture: NFNet-F has a 4-conv stem stem.conv1..4, found "
                              f"convs {sorted(stems)}.")
    stem_widths = tuple(source.shape(f"stem.conv{i}.weight")[0] for i in range(1, 5))
    stages = layer_indices(names, r"stages\.(\d+)\.\d+\.conv1\.weight", "stages", path)
    depths = tuple(len(layer_indices(names, rf"stages\.{s}\.(\d+)\.conv1\.weight", f"blocks of stage {s}", path))
                   for s in stages)
    widths = tuple(source.shape(f"stages.{s}.0.conv3.weight")[0] for s in stages)
    group_width = source.shape("stages.0.0.conv2.weight")[1]  # [mid, mid/groups, 3, 3]
    final_conv = "final_conv.weight" in names
    if final_conv and source.shape("final_conv.weight")[0] != 2 * widths[-1]:
        raise ConversionError(f"{path}: final_conv widens {widths[-1]} channels to "
                              f"{source.shape('final_conv.weight')[0]}; our NFNet's final conv doubles them.")

    variant = next((name for name, spec in NFNET_VARIANTS.items() if name.startswith("F")
                    and (spec.widths, spec.depths, spec.stem_widths, spec.group_width)
                    == (widths, depths, stem_widths, group_width)), "custom")
    shape = dict(widths=widths, depths=depths, stem_widths=stem_widths, group_width=group_width) \
        if variant == "custom" else {}
    nfnet = NFNetConfig(variant=variant, final_conv=final_conv, **shape, **TIMM_NUMERICS)
    description = (f"NFNet-{variant}" if variant != "custom" else "custom NFNet") + (
        f": widths {widths}, depths {depths}, stem {stem_widths}, group width {group_width}, "
        f"{'with' if final_conv else 'without'} final conv")
    assumptions = () if options.image_size else (
        "image size not set: an NFNet's weights fit any multiple of 32; the config keeps its own (pass --image_size)",)
    vision = VisionConfig(encoder="nfnet", image_size=options.image_size or VisionConfig.image_size, nfnet=nfnet)
    return Architecture(vision, table(nfnet, widths, depths, stem_widths[-1], description),
                        preprocessing=dict(mean=IMAGENET_MEAN, std=IMAGENET_STD), image_size=options.image_size,
                        assumptions=assumptions)
