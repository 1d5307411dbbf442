"""OpenFlamingo's trainable weights (its `checkpoint.pt` / `Flamingo.state_dict()`) -> ours.

    perceiver.latents                                resampler/latents
    perceiver.frame_embs [F, D] (if any)             resampler/temporal_embedding
    perceiver.media_time_embs [M, 1, D] (if any)     resampler/media_position_embedding [M, D]
    perceiver.layers.L.0 (PerceiverAttention)        resampler/layers/* (stacked, layer L)
        norm_media, norm_latents                         media_norm, latent_norm
        to_q [H*Dh, D]                                   query [D, H, Dh]
        to_kv [2*H*Dh, D] (keys first)                   key, value [D, H, Dh]
        to_out [D, H*Dh]                                 out [H, Dh, D]
    perceiver.layers.L.1.{0,1,3} (FeedForward)       ffw_norm, ffw/wi, ffw/wo
    perceiver.norm                                   resampler/final_norm
    lang_encoder.gated_cross_attn_layers.I           xattn/* (stacked: block j is OpenFlamingo's
        attn.norm, attn.to_q, attn.to_kv, attn.to_out    entry I = config.xattn_layers[j]; the list
        attn_gate [1], ff_gate [1]                       has None, so no tensors, elsewhere)
        ff.{0,1,3}                                       attention_norm, query, key/value, out,
                                                         attention_gate, ffw_gate, ffw_norm, ffw/wi, ffw/wo
    lang_encoder.<input embedding>.weight [V+n, D]   new_token_embedding = rows V: (`<|endofchunk|>`,
                                                     `<image>`, and `<PAD>` where the tokenizer gained one)
    lang_encoder.<output embedding>.weight (untied)  new_token_unembedding = rows V:, transposed

OpenFlamingo wraps each decoder layer in a `FlamingoLayer` (`<layers>.I.decoder_layer`,
`<layers>.I.gated_cross_attn_layer`), so its state dict holds every block twice: under
`gated_cross_attn_layers.I` and under the wrapper. The wrapper's copies are checked equal
to the list's and not converted again. Rows [0, V) of the embeddings are the frozen LM's
vocabulary (`frozen_embedding_table`): OpenFlamingo trains the whole input embedding, so
a checkpoint's rows replace the base LM's. The vision tower and the decoder layers are the
backbone converters' (`vision_encoder.*`, `lang_encoder.*` outside the above).
`export_trainable` goes the other way, for OpenFlamingo's `load_state_dict(strict=False)`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from flamingo_jax.convert import transforms as t
from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.convert.mapping import Rule, Table, plan, produce, torch_layer_norm
from flamingo_jax.convert.sources import TensorSource
from flamingo_jax.models.config import FlamingoConfig

FORMAT = "openflamingo"


@dataclasses.dataclass(frozen=True)
class LMLayout:
    """Where a Hugging Face decoder family keeps what OpenFlamingo touches (under `lang_encoder.`)."""

    family: str
    input_embedding: str
    output_embedding: str | None  # None: tied to the input embedding
    layers: str  # the nn.ModuleList that OpenFlamingo wraps into FlamingoLayers


LM_LAYOUTS = {
    "mpt": LMLayout("mpt", "transformer.wte", None, "transformer.blocks"),
    "gpt_neox": LMLayout("gpt_neox", "gpt_neox.embed_in", "embed_out", "gpt_neox.layers"),
    "llama": LMLayout("llama", "model.embed_tokens", "lm_head", "model.layers"),
}


def lm_layout(names: list[str]) -> LMLayout:
    """The decoder family of an OpenFlamingo state dict, from its input embedding's name."""
    found = [layout for layout in LM_LAYOUTS.values()
             if f"lang_encoder.{layout.input_embedding}.weight" in names]
    if len(found) != 1:
        raise ConversionError(
            "cannot tell the language model of this OpenFlamingo checkpoint: expected exactly one of "
            f"{[f'lang_encoder.{l.input_embedding}.weight' for l in LM_LAYOUTS.values()]} (MPT, GPT-NeoX, LLaMA).")
    return found[0]


def _rows(start: int, stop: int | None = None) -> t.Transform:
    def take(x):
        return x[start:stop]

    take.__name__ = f"rows_{start}_{'' if stop is None else stop}"
    return take


def _scalar(x):
    """A torch gate parameter [1] -> our scalar."""
    return x.reshape(())


def _media_rows(x):
    """OpenFlamingo's media_time_embs [M, 1, D] -> [M, D]."""
    return x.reshape(x.shape[0], x.shape[-1])


def _attention(target: str, source: str, heads: int, layers: tuple[int, ...]) -> list[Rule]:
    """q / fused kv / out projections of OpenFlamingo's attentions (no biases)."""
    rules = [Rule(f"{target}/query/kernel", f"{source}.to_q.weight", t.heads_out(heads), layers),
             Rule(f"{target}/out/kernel", f"{source}.to_out.weight", t.heads_in(heads), layers)]
    for part, name in enumerate(("key", "value")):
        rules.append(Rule(f"{target}/{name}/kernel", f"{source}.to_kv.weight",
                          t.compose(t.split_fused(part, 2), t.heads_out(heads)), layers))
    return rules


def _feed_forward(target: str, source: str, layers: tuple[int, ...]) -> list[Rule]:
    """OpenFlamingo's FeedForward: Sequential(LayerNorm, Linear, GELU, Linear), no biases."""
    return (torch_layer_norm(f"{target}_norm", f"{source}.0", layers)
            + [Rule(f"{target}/wi/kernel", f"{source}.1.weight", t.torch_linear, layers),
               Rule(f"{target}/wo/kernel", f"{source}.3.weight", t.torch_linear, layers)])


def trainable_table(cfg: FlamingoConfig, layout: LMLayout) -> Table:
    """Rules for our trainable state (`nnx.state(model, nnx.Param)` as a pure dict)."""
    r = cfg.resampler
    stacked = tuple(range(r.num_layers))
    perceiver = "perceiver.layers.{layer}"
    rules = [Rule("resampler/latents", "perceiver.latents")]
    if r.frame_embedding:
        rules.append(Rule("resampler/temporal_embedding", "perceiver.frame_embs"))
    if r.media_positions:
        rules.append(Rule("resampler/media_position_embedding", "perceiver.media_time_embs", _media_rows))
    rules += torch_layer_norm("resampler/layers/media_norm", f"{perceiver}.0.norm_media", stacked)
    rules += torch_layer_norm("resampler/layers/latent_norm", f"{perceiver}.0.norm_latents", stacked)
    rules += _attention("resampler/layers", f"{perceiver}.0", r.num_heads, stacked)
    rules += _feed_forward("resampler/layers/ffw", f"{perceiver}.1", stacked)
    rules += torch_layer_norm("resampler/final_norm", "perceiver.norm")

    blocks = cfg.xattn_layers
    block = "lang_encoder.gated_cross_attn_layers.{layer}"
    rules += torch_layer_norm("xattn/attention_norm", f"{block}.attn.norm", blocks)
    rules += _attention("xattn", f"{block}.attn", cfg.xattn.num_heads, blocks)
    rules += _feed_forward("xattn/ffw", f"{block}.ff", blocks)
    rules += [Rule("xattn/attention_gate", f"{block}.attn_gate", _scalar, blocks),
              Rule("xattn/ffw_gate", f"{block}.ff_gate", _scalar, blocks)]

    vocab = cfg.decoder.vocab_size
    rules.append(Rule("new_token_embedding", f"lang_encoder.{layout.input_embedding}.weight", _rows(vocab)))
    if not cfg.decoder.tie_embeddings:
        if layout.output_embedding is None:
            raise ConversionError(f"the config unties the embeddings but {layout.family} ties them; set "
                                  "model.decoder.tie_embeddings=True.")
        rules.append(Rule("new_token_unembedding", f"lang_encoder.{layout.output_embedding}.weight",
                          t.compose(_rows(vocab), t.torch_linear)))
    ignored = (r"vision_encoder\..*",  # the vision converter's
               r"lang_encoder\.(?!gated_cross_attn_layers\.).*")  # the decoder converter's, and the aliases
    return Table(tuple(rules), ignored=ignored,
                 description=f"OpenFlamingo, {layout.family} LM, xattn before layers {list(blocks)}")


def frozen_embedding_table(cfg: FlamingoConfig, layout: LMLayout) -> Table:
    """Rules for the frozen vocabulary rows of our decoder (`decoder/embedding`, and
    `decoder/unembedding` when untied) from rows [0, V) of OpenFlamingo's embeddings."""
    vocab = cfg.decoder.vocab_size
    rules = [Rule("decoder/embedding", f"lang_encoder.{layout.input_embedding}.weight", _rows(0, vocab))]
    if not cfg.decoder.tie_embeddings:
        rules.append(Rule("decoder/unembedding", f"lang_encoder.{layout.output_embedding}.weight",
                          t.compose(_rows(0, vocab), t.torch_linear)))
    used = {rule.source for rule in rules}
    return Table(tuple(rules), ignored=(rf"(?!(?:{'|'.join(re.escape(name) for name in used)})$).*",),
                 description=f"OpenFlamingo, {layout.family} LM embeddings")


def check_aliases(source: TensorSource, layout: LMLayout) -> None:
    """Each FlamingoLayer's `gated_cross_attn_layer.*` must equal the list entry it wraps."""
    pattern = re.compile(rf"lang_encoder\.{re.escape(layout.layers)}\.(\d+)\.gated_cross_attn_layer\.(.+)")
    names = set(source.names())
    for name in sorted(names):
        match = pattern.fullmatch(name)
        if not match:
            continue
        original = f"lang_encoder.gated_cross_attn_layers.{match.group(1)}.{match.group(2)}"
        if original not in names:
            raise ConversionError(f"{source.path}: {name} has no {original}; the checkpoint's xattn blocks are "
                                  "incomplete.")
        if not np.array_equal(source.read(name), source.read(original)):
            raise ConversionError(f"{source.path}: {name} differs from {original}, which it should alias; the "
                                  "checkpoint was edited inconsistently.")


def _nest(pairs) -> dict[str, Any]:
    out: dict[Any, Any] = {}
    for keys, array in pairs:
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = array
    return out


def convert(table: Table, source: TensorSource, target: dict[str, Any], dtype: Any = None) -> dict[str, Any]:
    """`table` applied to `source`: a pure dict shaped as `target` (abstract arrays), checked first."""
    return _nest(produce(plan(table, source, target, fmt=FORMAT), source, dtype))


def convert_trainable(source: TensorSource, cfg: FlamingoConfig, dtype: Any = np.float32) -> dict[str, Any]:
    """Our trainable state for `cfg` as a pure dict, from an OpenFlamingo state dict."""
    from flax import nnx

    from flamingo_jax.models.flamingo import Flamingo

    layout = lm_layout(source.names())
    abstract = nnx.eval_shape(lambda: Flamingo(cfg, rngs=nnx.Rngs(0)))
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    check_aliases(source, layout)
    return convert(trainable_table(cfg, layout), source, target, dtype)


# ------------------------------------------------------------------ export (ours -> OpenFlamingo)


def _torch_q(kernel: np.ndarray) -> np.ndarray:
    """Our per-head kernel [D, H, Dh] -> torch Linear weight [H*Dh, D]."""
    return kernel.reshape(kernel.shape[0], -1).T


def _torch_out(kernel: np.ndarray) -> np.ndarray:
    """Our output kernel [H, Dh, D] -> torch Linear weight [D, H*Dh]."""
    return kernel.reshape(-1, kernel.shape[-1]).T


def _export_attention(prefix: str, ours: dict[str, Any], index: int) -> dict[str, np.ndarray]:
    at = lambda name: np.asarray(ours[name]["kernel"][index])
    return {f"{prefix}.to_q.weight": _torch_q(at("query")),
            f"{prefix}.to_kv.weight": np.concatenate([_torch_q(at("key")), _torch_q(at("value"))], axis=0),
            f"{prefix}.to_out.weight": _torch_out(at("out"))}


def _export_norm(prefix: str, norm: dict[str, Any], index: int | None = None) -> dict[str, np.ndarray]:
    pick = (lambda a: np.asarray(a)) if index is None else (lambda a: np.asarray(a[index]))
    return {f"{prefix}.weight": pick(norm["scale"]), f"{prefix}.bias": pick(norm["bias"])}


def _export_feed_forward(prefix: str, norm: dict[str, Any], ffw: dict[str, Any], index: int) -> dict[str, np.ndarray]:
    return {**_export_norm(f"{prefix}.0", norm, index),
            f"{prefix}.1.weight": np.asarray(ffw["wi"]["kernel"][index]).T,
            f"{prefix}.3.weight": np.asarray(ffw["wo"]["kernel"][index]).T}


def export_trainable(trainable: dict[str, Any], cfg: FlamingoConfig, layout: LMLayout, *,
                     embedding: np.ndarray, unembedding: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Our trainable state (a pure dict) -> OpenFlamingo state-dict entries (numpy, torch layouts)
    for `load_state_dict(..., strict=False)`: the Perceiver, every xattn block under
    `gated_cross_attn_layers.I` and its FlamingoLayer alias, and the LM embeddings, which
    OpenFlamingo keeps whole: our frozen vocabulary rows (`embedding` [V, D], `unembedding`
    [D, V] when untied) followed by the new-token rows."""
    resampler, xattn = trainable["resampler"], trainable["xattn"]
    out = {"perceiver.latents": np.asarray(resampler["latents"])}
    if cfg.resampler.frame_embedding:
        out["perceiver.frame_embs"] = np.asarray(resampler["temporal_embedding"])
    if cfg.resampler.media_positions:
        table = np.asarray(resampler["media_position_embedding"])
        out["perceiver.media_time_embs"] = table.reshape(table.shape[0], 1, table.shape[1])
    stacked = resampler["layers"]
    for layer in range(cfg.resampler.num_layers):
        prefix = f"perceiver.layers.{layer}"
        out.update(_export_norm(f"{prefix}.0.norm_media", stacked["media_norm"], layer))
        out.update(_export_norm(f"{prefix}.0.norm_latents", stacked["latent_norm"], layer))
        out.update(_export_attention(f"{prefix}.0", stacked, layer))
        out.update(_export_feed_forward(f"{prefix}.1", stacked["ffw_norm"], stacked["ffw"], layer))
    out.update(_export_norm("perceiver.norm", resampler["final_norm"]))

    for block, layer in enumerate(cfg.xattn_layers):
        entries = {**_export_norm("attn.norm", xattn["attention_norm"], block),
                   **_export_attention("attn", xattn, block),
                   **_export_feed_forward("ff", xattn["ffw_norm"], xattn["ffw"], block),
                   "attn_gate": np.asarray(xattn["attention_gate"][block]).reshape(1),
                   "ff_gate": np.asarray(xattn["ffw_gate"][block]).reshape(1)}
        for name, value in entries.items():
            out[f"lang_encoder.gated_cross_attn_layers.{layer}.{name}"] = value
            out[f"lang_encoder.{layout.layers}.{layer}.gated_cross_attn_layer.{name}"] = value

    out[f"lang_encoder.{layout.input_embedding}.weight"] = np.concatenate(
        [np.asarray(embedding), np.asarray(trainable["new_token_embedding"])], axis=0)
    if not cfg.decoder.tie_embeddings:
        if unembedding is None or layout.output_embedding is None:
            raise ConversionError("an untied model's export needs its frozen `unembedding` and an LM with an "
                                  "output embedding.")
        out[f"lang_encoder.{layout.output_embedding}.weight"] = np.concatenate(
            [np.asarray(unembedding), np.asarray(trainable["new_token_unembedding"])], axis=1).T
    return {name: np.array(value, order="C") for name, value in out.items()}  # writable copies (torch.from_numpy)
