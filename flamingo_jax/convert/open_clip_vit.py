"""open_clip's `VisionTransformer` (the `visual.` tower of a CLIP model, as OpenFlamingo uses it) -> models/vit.py.

    conv1                                  patch_embed/kernel
    class_embedding, positional_embedding  the same
    ln_pre, ln_post                        ln_pre, ln_post (norm_output: the tokens with
                                           `output_tokens=True` are ln_post'd)
    transformer.resblocks.L.*              blocks/* (stacked, layer L)
        ln_1, ln_2                             ln_1, ln_2
        attn.in_proj_weight/bias [3W, W]       query / key / value (rows 0:W, W:2W, 2W:3W, per head)
        attn.out_proj                          out
        mlp.c_fc, mlp.c_proj                   mlp/wi, mlp/wo
    proj                                   (ignored: projects the pooled class token only)

Prefixed `visual.` (a whole CLIP state dict; the text tower is ignored) or not
(the tower saved alone). Shapes give width, depth, patch and image size; a fused
QKV weight hides the number of heads and nothing records the activation, so
both come from `open_clip_config.json` beside the weights (open_clip's hub
layout) or from --num_heads / --activation (quick_gelu for OpenAI's weights
and open_clip's *-quickgelu models, gelu_exact for models trained with nn.GELU).
"""

from __future__ import annotations

import re

from flamingo_jax.convert import transforms as t
from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.convert.families import (
    CLIP_MEAN,
    CLIP_STD,
    Architecture,
    Options,
    choose,
    clip_vit,
    layer_indices,
    square_grid,
)
from flamingo_jax.convert.mapping import Rule, Table, torch_dense, torch_layer_norm
from flamingo_jax.convert.sources import TensorSource
from flamingo_jax.models.config import VisionConfig, ViTConfig

FORMAT = "open_clip"
SIGNATURE = "open_clip vision towers have [visual.]conv1.weight and transformer.resblocks.<l>.attn.in_proj_weight"


def _prefix(names: list[str]) -> str:
    return "visual." if any(name.startswith("visual.") for name in names) else ""


def looks_like(names: list[str]) -> bool:
    prefix = _prefix(names)
    return (f"{prefix}conv1.weight" in names
            and f"{prefix}transformer.resblocks.0.attn.in_proj_weight" in names)


def table(vit: ViTConfig, prefix: str, description: str) -> Table:
    p, layers, heads = prefix, range(vit.num_layers), vit.num_heads
    block = f"{p}transformer.resblocks.{{layer}}"
    rules = [Rule("patch_embed/kernel", f"{p}conv1.weight", t.torch_conv),
             Rule("class_embedding", f"{p}class_embedding"),
             Rule("positional_embedding", f"{p}positional_embedding")]
    rules += torch_layer_norm("ln_pre", f"{p}ln_pre")
    rules += torch_layer_norm("blocks/ln_1", f"{block}.ln_1", layers)
    for part, name in enumerate(("query", "key", "value")):
        split = t.compose(t.split_fused(part), t.heads_out(heads))
        rules += [Rule(f"blocks/{name}/kernel", f"{block}.attn.in_proj_weight", split, tuple(layers)),
                  Rule(f"blocks/{name}/bias", f"{block}.attn.in_proj_bias", split, tuple(layers))]
    rules += torch_dense("blocks/out", f"{block}.attn.out_proj", layers, kernel=t.heads_in(heads))
    rules += torch_layer_norm("blocks/ln_2", f"{block}.ln_2", layers)
    rules += torch_dense("blocks/mlp/wi", f"{block}.mlp.c_fc", layers)
    rules += torch_dense("blocks/mlp/wo", f"{block}.mlp.c_proj", layers)
    ignored = [rf"{p}proj"]
    if vit.norm_output:
        rules += torch_layer_norm("ln_post", f"{p}ln_post")
    else:
        ignored.append(rf"{p}ln_post\.(weight|bias)")
    if p:
        ignored.append(r"(?!visual\.).*")  # the text tower and logit scale of a whole CLIP model
    return Table(tuple(rules), ignored=tuple(ignored), description=description)


def _recorded(source: TensorSource) -> tuple[int | None, str | None]:
    """(heads, activation) from open_clip_config.json's model_cfg, if the source has one."""
    model_cfg = source.config.get("open_clip_config.json", {}).get("model_cfg")
    if not model_cfg:
        return None, None
    vision_cfg = model_cfg.get("vision_cfg", {})
    width = vision_cfg.get("width")
    heads = width // vision_cfg.get("head_width", 64) if isinstance(width, int) else None
    return heads, "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu_exact"


def read_architecture(source: TensorSource, options: Options) -> Architecture:
    names, path = source.names(), source.path
    p = _prefix(names)
    width = source.shape(f"{p}class_embedding")[0] if f"{p}class_embedding" in names else None
    if width is None:
        raise ConversionError(f"{path}: no {p}class_embedding; open_clip towers without a class token are not "
                              "supported (unknown architecture).")
    num_layers = len(layer_indices(names, rf"{re.escape(p)}transformer\.resblocks\.(\d+)\.ln_1\.weight", "blocks",
                                   path))
    patch = source.shape(f"{p}conv1.weight")[-1]
    grid = square_grid(source.shape(f"{p}positional_embedding")[0], True, path)
    hidden = source.shape(f"{p}transformer.resblocks.0.mlp.c_fc.weight")[0]
    recorded_heads, recorded_activation = _recorded(source)
    how = "pass it (and --activation) explicitly, or keep open_clip_config.json beside the weights."
    heads = choose("num_heads", options.num_heads, recorded_heads, path,
                   f"pass --num_heads (open_clip: width / head_width, 64 unless the model config says); {how}")
    activation = choose("activation", options.activation, recorded_activation, path,
                        "pass --activation=quick_gelu (OpenAI CLIP weights, open_clip *-quickgelu models) or "
                        f"--activation=gelu_exact (models trained with nn.GELU); {how}")
    vit, image_size, description = clip_vit(
        width=width, num_layers=num_layers, heads=heads, patch=patch, grid=grid, hidden=hidden,
        activation=activation, norm_eps=1e-5,
        norm_output=True if options.norm_output is None else options.norm_output, options=options, path=path)
    assumptions = tuple(f"{name}={value} (from --{name})" for name, value, recorded in (
        ("num_heads", heads, recorded_heads), ("activation", activation, recorded_activation)) if recorded is None)
    preprocess = source.config.get("open_clip_config.json", {}).get("preprocess_cfg", {})
    prep = dict(mean=tuple(preprocess.get("mean", CLIP_MEAN)), std=tuple(preprocess.get("std", CLIP_STD)))
    return Architecture(VisionConfig(encoder="vit", image_size=image_size, vit=vit), table(vit, p, description),
                        preprocessing=prep, image_size=image_size, assumptions=assumptions)
