"""Hugging Face `MptForCausalLM` (MosaicML MPT) -> models/decoder.py.

    transformer.wte                         embedding (tied: lm_head is the same matrix)
    transformer.blocks.L.*                  layers/* (stacked, layer L)
        norm_1, norm_2                          attention_norm, ffw_norm (LayerNorm without bias)
        attn.Wqkv                               attention/{query,key,value}: q, k, v row blocks
        attn.out_proj                           attention/out
        ffn.up_proj, ffn.down_proj              ffw/wi, ffw/wo (erf GELU)
    transformer.norm_f                      final_norm

Positions are ALiBi with MPT's slopes (max bias 8: transformers ignores
`alibi_bias_max`, so other values are refused). transformers' MPT adds
the penalty relative to the last key rather than the query: that differs from
ours by a constant per query row, which softmax cancels. Neither its linears nor
its LayerNorms have biases, whatever `no_bias` says. Options its module does not
implement the same way (clip_qkv, a softmax_scale other than 1/sqrt(head_dim),
logit_scale, no ALiBi) are refused.
"""

from __future__ import annotations

from typing import Any

from flamingo_jax.convert import transforms as t
from flamingo_jax.convert.errors import ConversionError
from flamingo_jax.convert.families import DecoderArchitecture, hf_value
from flamingo_jax.convert.mapping import Rule, Table
from flamingo_jax.convert.sources import TensorSource
from flamingo_jax.models.config import DecoderConfig

FORMAT = "mpt"
EMBEDDING = "transformer.wte.weight"  # its rows are the vocabulary
ARCHITECTURES = ("MptForCausalLM", "MPTForCausalLM", "mpt")
# MptConfig's defaults: `save_pretrained` writes only the fields that differ from them.
HF_DEFAULTS = dict(d_model=2048, n_heads=16, n_layers=24, expansion_ratio=4, max_seq_len=2048, vocab_size=50368,
                   layer_norm_epsilon=1e-5, logit_scale=None, no_bias=True)
ATTN_DEFAULTS = dict(alibi=True, alibi_bias_max=8, clip_qkv=None, softmax_scale=None, qk_ln=False,
                     attn_type="multihead_attention")


def table(d: DecoderConfig, description: str) -> Table:
    layers = tuple(range(d.num_layers))
    layer = "transformer.blocks.{layer}"
    rules = [Rule("embedding", EMBEDDING)]
    for ours, theirs, prefix in (("layers/attention_norm", f"{layer}.norm_1", True),
                                 ("layers/ffw_norm", f"{layer}.norm_2", True),
                                 ("final_norm", "transformer.norm_f", False)):
        stacked = layers if prefix else ()
        rules.append(Rule(f"{ours}/scale", f"{theirs}.weight", layers=stacked))
    for part, ours in enumerate(("query", "key", "value")):
        rules.append(Rule(f"layers/attention/{ours}/kernel", f"{layer}.attn.Wqkv.weight",
                          t.compose(t.split_fused(part), t.heads_out(d.num_heads)), layers))
    rules.append(Rule("layers/attention/out/kernel", f"{layer}.attn.out_proj.weight", t.heads_in(d.num_heads),
                      layers))
    rules.append(Rule("layers/ffw/wi/kernel", f"{layer}.ffn.up_proj.weight", t.torch_linear, layers))
    rules.append(Rule("layers/ffw/wo/kernel", f"{layer}.ffn.down_proj.weight", t.torch_linear, layers))
    return Table(tuple(rules), ignored=(r"lm_head\.weight",), description=description)


def read_architecture(source: TensorSource, config: dict[str, Any]) -> DecoderArchitecture:
    path = source.path
    c = {**HF_DEFAULTS, **config}
    attn = {**ATTN_DEFAULTS, **(c.get("attn_config") or {})}
    get = lambda name, kind=int: hf_value(c, name, None, path, kind)
    dim, heads = get("d_model"), get("n_heads")
    if dim % heads:
        raise ConversionError(f"{path}: d_model {dim} is not a multiple of n_heads {heads}.")
    head_dim = dim // heads
    unsupported = []
    if not attn["alibi"]:
        unsupported.append("attn_config.alibi=false (learned positions)")
    if attn["clip_qkv"]:
        unsupported.append(f"attn_config.clip_qkv={attn['clip_qkv']}")
    if attn["softmax_scale"] is not None and abs(attn["softmax_scale"] - head_dim ** -0.5) > 1e-9:
        unsupported.append(f"attn_config.softmax_scale={attn['softmax_scale']}")
    if attn["alibi_bias_max"] != 8:  # transformers builds its ALiBi with 8 whatever the config says
        unsupported.append(f"attn_config.alibi_bias_max={attn['alibi_bias_max']} (transformers' MPT always "
                           "uses 8, so the reference and the training code disagree on this checkpoint)")
    if attn["attn_type"] != "multihead_attention":
        unsupported.append(f"attn_config.attn_type={attn['attn_type']!r}")
    if c.get("logit_scale") is not None:
        unsupported.append(f"logit_scale={c['logit_scale']}")
    if unsupported:
        raise ConversionError(f"{path}: config.json sets {', '.join(unsupported)}, which this converter does not "
                              "support for MPT.")
    # transformers' MPT has no biases at all, whatever `no_bias` says (its LayerNorms drop theirs
    # "for weights on the Hub"); a checkpoint that has them gets them listed as unexpected tensors.
    decoder = DecoderConfig(
        vocab_size=get("vocab_size"), dim=dim, num_layers=get("n_layers"), num_heads=heads, head_dim=head_dim,
        ffw_hidden=4 * dim,  # transformers' MptMLP is 4 x d_model whatever expansion_ratio says
        ffw="gelu_exact", positions="alibi", alibi_max_bias=float(attn["alibi_bias_max"]),
        max_len=get("max_seq_len"), tie_embeddings=True, norm="layer", norm_bias=False,
        norm_eps=get("layer_norm_epsilon", float))
    assumptions = []
    if c.get("expansion_ratio", 4) != 4:
        assumptions.append(f"expansion_ratio={c['expansion_ratio']} is ignored, as transformers' MPT does "
                           "(its MLP is 4 x d_model).")
    description = (f"dim {dim}, {decoder.num_layers} layers, {heads} heads x {head_dim}, ALiBi (max bias "
                   f"{decoder.alibi_max_bias:g}), MLP {decoder.ffw_hidden}, vocab {decoder.vocab_size}, LayerNorm "
                   "without bias")
    return DecoderArchitecture(decoder, table(decoder, description), tuple(assumptions))
