"""Hugging Face `CLIPVisionModel` / `CLIPModel` (`vision_model.` tensors) -> models/vit.py.

    embeddings.patch_embedding             patch_embed/kernel
    embeddings.class_embedding             class_embedding
    embeddings.position_embedding          positional_embedding
    pre_layrnorm (sic), post_layernorm     ln_pre, ln_post (only with norm_output)
    encoder.layers.L.*                     blocks/* (stacked, layer L)
        layer_norm1, layer_norm2               ln_1, ln_2
        self_attn.{q,k,v}_proj                 query, key, value (per head)
        self_attn.out_proj                     out
        mlp.fc1, mlp.fc2                       mlp/wi, mlp/wo

Everything outside `vision_model.` (the text tower, projections, logit scale)
is ignored. The architecture comes from `config.json` (`model_type` 'clip'
with its `vision_config`, or 'clip_vision_model'); without one, from the
shapes and --num_heads / --activation. HF's `last_hidden_state` is not
normalised by post_layernorm (that only normalises the pooled class token), so
the converted encoder returns the same patch tokens: `norm_output=False`,
unless --norm_output asks for open_clip's (and OpenFlamingo's) normalised ones.
"""

from __future__ import annotations

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

FORMAT = "hf_clip"
SIGNATURE = "HF CLIP vision towers have vision_model.embeddings.patch_embedding.weight"
PREFIX = "vision_model."
MODEL_TYPES = ("clip", "clip_vision_model")
# CLIPVisionConfig's defaults: `save_pretrained` writes only the fields that differ from them.
HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# HF `hidden_act` -> our activation name.
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


def looks_like(names: list[str]) -> bool:
    return f"{PREFIX}embeddings.patch_embedding.weight" in names


def table(vit: ViTConfig, description: str) -> Table:
    p, layers, heads = PREFIX, range(vit.num_layers), vit.num_heads
    layer = f"{p}encoder.layers.{{layer}}"
    rules = [Rule("patch_embed/kernel", f"{p}embeddings.patch_embedding.weight", t.torch_conv),
             Rule("class_embedding", f"{p}embeddings.class_embedding"),
             Rule("positional_embedding", f"{p}embeddings.position_embedding.weight")]
    rules += torch_layer_norm("ln_pre", f"{p}pre_layrnorm")
    rules += torch_layer_norm("blocks/ln_1", f"{layer}.layer_norm1", layers)
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        rules += torch_dense(f"blocks/{ours}", f"{layer}.self_attn.{theirs}", layers, kernel=t.heads_out(heads),
                             bias=t.heads_out(heads))
    rules += torch_dense("blocks/out", f"{layer}.self_attn.out_proj", layers, kernel=t.heads_in(heads))
    rules += torch_layer_norm("blocks/ln_2", f"{layer}.layer_norm2", layers)
    rules += torch_dense("blocks/mlp/wi", f"{layer}.mlp.fc1", layers)
    rules += torch_dense("blocks/mlp/wo", f"{layer}.mlp.fc2", layers)
    # Outside the vision tower; position_ids is a buffer that older checkpoints saved.
    ignored = [r"(?!vision_model\.).*", rf"{p}embeddings\.position_ids"]
    if vit.norm_output:
        rules += torch_layer_norm("ln_post", f"{p}post_layernorm")
    else:
        ignored.append(rf"{p}post_layernorm\.(weight|bias)")
    return Table(tuple(rules), ignored=tuple(ignored), description=description)


def _vision_config(source: TensorSource) -> dict:
    """config.json's vision fields with HF's defaults filled in ({} without a config.json);
    unknown model types refused."""
    config = source.config.get("config.json")
    if config is None:
        return {}
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"{source.path}: unknown architecture: config.json has model_type {model_type!r}; "
                              f"hf_clip converts {MODEL_TYPES} (CLIPModel, CLIPVisionModel).")
    return {**HF_DEFAULTS, **(config.get("vision_config") or {} if model_type == "clip" else config)}


def read_architecture(source: TensorSource, options: Options) -> Architecture:
    names, path = source.names(), source.path
    recorded = _vision_config(source)
    width = source.shape(f"{PREFIX}embeddings.class_embedding")[0]
    patch = source.shape(f"{PREFIX}embeddings.patch_embedding.weight")[-1]
    grid = square_grid(source.shape(f"{PREFIX}embeddings.position_embedding.weight")[0], True, path)
    num_layers = len(layer_indices(names, r"vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.weight", "layers",
                                   path))
    hidden = source.shape(f"{PREFIX}encoder.layers.0.mlp.fc1.weight")[0]
    hidden_act = recorded.get("hidden_act")
    if hidden_act is not None and hidden_act not in HF_ACTIVATIONS:
        raise ConversionError(f"{path}: config.json's hidden_act {hidden_act!r} has no counterpart here; "
                              f"supported: {sorted(HF_ACTIVATIONS)}.")
    how = "or keep the model's config.json beside the weights."
    heads = choose("num_heads", options.num_heads, recorded.get("num_attention_heads"), path,
                   f"pass --num_heads, {how}")
    activation = choose("activation", options.activation, HF_ACTIVATIONS.get(hidden_act), path,
                        f"pass --activation (quick_gelu for OpenAI's CLIP), {how}")
    for field, value in (("hidden_size", width), ("num_hidden_layers", num_layers), ("patch_size", patch),
                         ("image_size", grid * patch), ("intermediate_size", hidden)):
        if field in recorded and recorded[field] != value:
            raise ConversionError(f"{path}: config.json says {field}={recorded[field]} but the tensors say {value}; "
                                  "the weights and config.json do not belong together.")
    vit, image_size, description = clip_vit(
        width=width, num_layers=num_layers, heads=heads, patch=patch, grid=grid, hidden=hidden,
        activation=activation, norm_eps=float(recorded.get("layer_norm_eps", 1e-5)),
        norm_output=False if options.norm_output is None else options.norm_output, options=options, path=path)
    assumptions = tuple(f"{name}={value} (from --{name})" for name, value, key in (
        ("num_heads", heads, "num_attention_heads"), ("activation", activation, "hidden_act")) if key not in recorded)
    return Architecture(VisionConfig(encoder="vit", image_size=image_size, vit=vit), table(vit, description),
                        preprocessing=dict(mean=CLIP_MEAN, std=CLIP_STD), image_size=image_size,
                        assumptions=assumptions)
