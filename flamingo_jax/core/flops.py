"""Analytic FLOPs of one train step, and model FLOPs utilisation (MFU).

Counts matmul and convolution FLOPs (2·m·n·k), the ones that set a step's time
on a TPU or GPU; elementwise work (norms, activations, softmax, the optimizer
update) is left out, so XLA's compiled count is a little higher, most visibly
for tiny widths. What a Flamingo train step runs, per dataset batch:

* the frozen vision encoder: forward only (its output is `stop_gradient`);
* the Perceiver Resampler: forward and backward (weights and inputs: 3x the
  forward), except that its input projection needs no input gradient (2x);
* the frozen LM: forward, plus the gradients of its *activations* in the
  backward (the trainable blocks below every layer need them) but none for its
  weights: about 1x the forward, not 2x;
* GATED XATTN-DENSE blocks, trainable: 3x the forward;
* attention score and value matmuls (LM, xattn, Resampler): both operands
  are activations, so the backward is 2x the forward (Transformer-XL's relative
  term is 1x: its other operand depends only on frozen weights);
* Transformer-XL's projected distance table: once per call and layer, before
  the layer scan (it depends only on frozen weights): no backward, no recompute;
* the logits (tied frozen embedding, plus the trainable new-token rows);
* rematerialisation, per `model.remat_policy`: the forward matmuls of the
  scanned bodies (LM layers, xattn blocks, Resampler layers) run again in the
  backward. 'full' recomputes every matmul whose operand or output the backward
  needs: all but the LM's and the Resampler's FFW output projections (only the
  layer output, a saved scan carry, depends on them). 'dots_no_batch' saves
  matmuls without batch dimensions and recomputes attention's, except the LM's
  attention-values matmul (only the saved input of a frozen projection depends
  on it). 'dots' and 'none' recompute no matmul.

`StepFlops.model` (no recompute) is what MFU divides by, the usual convention;
`StepFlops.total` includes recompute and is comparable with XLA's count.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from flamingo_jax.models.config import NFNET_VARIANTS, FlamingoConfig, TextEncoderConfig, nfnet_spec

# ------------------------------------------------------------------ chips


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float  # dense, per chip
    device_kinds: tuple[str, ...]  # `jax.Device.device_kind` values (prefix match, lower case)


# Peak dense bf16 matmul FLOP/s per chip (vendor figures). fp32 matmuls run well
# below these (several bf16 passes on TPU; TF32/FP32 on GPUs), so an fp32 run's
# MFU against the bf16 peak understates how busy the chip is.
CHIPS: dict[str, Chip] = {chip.name: chip for chip in (
    Chip("v4", 275e12, ("tpu v4",)),
    Chip("v5e", 197e12, ("tpu v5 lite", "tpu v5e")),
    Chip("v5p", 459e12, ("tpu v5p", "tpu v5")),
    Chip("v6e", 918e12, ("tpu v6 lite", "tpu v6e")),
    Chip("h100", 989e12, ("nvidia h100",)),  # SXM; the PCIe card is lower (756e12)
    Chip("h200", 989e12, ("nvidia h200",)),
)}


def chip_from_device_kind(device_kind: str) -> str | None:
    """'TPU v5 lite' -> 'v5e'; None when the kind is not in `CHIPS` (e.g. 'cpu')."""
    kind = device_kind.lower().strip()
    matches = [(len(prefix), chip.name) for chip in CHIPS.values() for prefix in chip.device_kinds
               if kind.startswith(prefix)]
    return max(matches)[1] if matches else None  # the longest prefix: 'tpu v5 lite' before 'tpu v5'


def detect_chip() -> str | None:
    """The chip of this process's first device, or None when its peak is unknown."""
    import jax

    return chip_from_device_kind(jax.devices()[0].device_kind)


def mfu(flops_per_step: float, step_seconds: float, num_chips: int, chip: str) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the chips' bf16 peak."""
    if chip not in CHIPS:
        raise ValueError(f"chip {chip!r} has no known peak; known chips are {sorted(CHIPS)}.")
    if step_seconds <= 0 or num_chips < 1:
        raise ValueError(f"step_seconds={step_seconds} and num_chips={num_chips} must be positive.")
    return flops_per_step / (step_seconds * num_chips * CHIPS[chip].peak_bf16_flops)


# ------------------------------------------------------------------ batches


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """One dataset's global batch, as far as FLOPs care."""

    batch_size: int
    seq_len: int
    num_media: int = 1
    num_frames: int = 1
    image_size: int = 0  # 0: the model's `vision.image_size`

    @classmethod
    def of(cls, batch: Mapping[str, Any]) -> "BatchShape":
        """From a batch's arrays (or ShapeDtypeStructs): tokens [B, L], media [B, M, T, H, W, 3]
        (none in text-only batches such as copying drills)."""
        batch_size, seq_len = batch["tokens"].shape
        if "media" not in batch:
            return cls(batch_size, seq_len, num_media=0)
        _, num_media, num_frames, height, _, _ = batch["media"].shape
        return cls(batch_size, seq_len, num_media, num_frames, height)


# ------------------------------------------------------------------ results


@dataclasses.dataclass(frozen=True)
class ComponentFlops:
    forward: float = 0.0
    backward: float = 0.0
    recompute: float = 0.0  # forward FLOPs run again in the backward pass (remat)

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute

    def __add__(self, other: "ComponentFlops") -> "ComponentFlops":
        return ComponentFlops(self.forward + other.forward, self.backward + other.backward,
                              self.recompute + other.recompute)

    def scaled(self, factor: float) -> "ComponentFlops":
        return ComponentFlops(self.forward * factor, self.backward * factor, self.recompute * factor)


class _Totals:
    """Sums over a step's components (the dataclass fields of a subclass)."""

    def components(self) -> dict[str, ComponentFlops]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def forward(self) -> float:
        return sum(c.forward for c in self.components().values())

    @property
    def backward(self) -> float:
        return sum(c.backward for c in self.components().values())

    @property
    def recompute(self) -> float:
        return sum(c.recompute for c in self.components().values())

    @property
    def model(self) -> float:
        """Forward + backward, without remat recompute: MFU's numerator."""
        return self.forward + self.backward

    @property
    def total(self) -> float:
        """Everything the step executes, recompute included: comparable with XLA's count."""
        return self.model + self.recompute

    def as_dict(self) -> dict[str, Any]:
        return {
            "components": {name: {**dataclasses.asdict(c), "total": c.total} for name, c in self.components().items()},
            "forward": self.forward, "backward": self.backward, "recompute": self.recompute,
            "model": self.model, "total": self.total,
        }


@dataclasses.dataclass(frozen=True)
class StepFlops(_Totals):
    """FLOPs of one Flamingo train step (all datasets, all micro-batches), per component.

    `lm`, `xattn` and `resampler` count their weight matmuls; `attention` holds
    the score/value matmuls of all three."""

    vision_encoder: ComponentFlops
    resampler: ComponentFlops
    xattn: ComponentFlops
    lm: ComponentFlops
    attention: ComponentFlops
    logits: ComponentFlops


@dataclasses.dataclass(frozen=True)
class ContrastiveStepFlops(_Totals):
    """FLOPs of one contrastive pretraining step (`contrastive_step_flops`), per component:
    `text_encoder` counts its weight matmuls and `attention` its score/value matmuls;
    `heads` the two projections into the joint space and the [B, B] similarity matrix."""

    vision_encoder: ComponentFlops
    text_encoder: ComponentFlops
    attention: ComponentFlops
    heads: ComponentFlops


# ------------------------------------------------------------------ per component (forward FLOPs)


def nfnet_forward_flops(variant: Any, image_size: int, final_conv: bool = True) -> float:
    """Convolution (and squeeze-excite) FLOPs of one NFNet image, 'SAME' padding;
    `variant` is a published variant's name or an `nfnet.NFNetSpec`."""
    parts = _nfnet_forward_parts(variant, image_size, final_conv)
    return sum(parts.values()) - parts["strided_input_gradient_extra"]


def _nfnet_forward_parts(variant: Any, image_size: int, final_conv: bool = True) -> dict[str, float]:
    """One image's NFNet FLOPs split as its training needs them: 'first_conv' (the only conv
    whose input, the image, needs no gradient); 'scanned_convs' and 'scanned_se' (the blocks
    after each stage's first, which remat recomputes; 'se': squeeze-excite's matmuls, which
    'dots_no_batch' saves where it does not save convolutions); 'rest'. And, not part of the
    forward, 'strided_input_gradient_extra': the input gradient of a stride-s convolution is a
    convolution over the s-dilated output gradient, s^2 times its forward as the program states it."""
    spec = NFNET_VARIANTS[variant] if isinstance(variant, str) else variant
    parts = dict(first_conv=0.0, scanned_convs=0.0, scanned_se=0.0, rest=0.0, strided_input_gradient_extra=0.0)
    size, part = image_size, "first_conv"

    def conv(size_in, cin, cout, kernel, stride=1, groups=1):
        size_out = -(-size_in // stride)
        count = 2.0 * size_out**2 * kernel**2 * (cin // groups) * cout
        parts[part] += count
        if part != "first_conv":
            parts["strided_input_gradient_extra"] += (stride**2 - 1) * count
        return size_out

    s0, s1, s2, s3 = spec.stem_widths
    size = conv(size, 3, s0, 3, stride=2)
    part = "rest"
    size = conv(size, s0, s1, 3)
    size = conv(size, s1, s2, 3)
    size = conv(size, s2, s3, 3, stride=2)
    in_ch = s3
    for width, depth, stride in zip(spec.widths, spec.depths, spec.strides):
        groups = int(width * spec.bottleneck_ratio) // spec.group_width
        mid = groups * spec.group_width
        for index in range(depth):
            part = "rest" if index == 0 else "scanned_convs"
            block_stride, block_in = (stride, in_ch) if index == 0 else (1, width)
            out_size = -(-size // block_stride)
            if block_stride > 1 or block_in != width:  # shortcut 1x1 conv (after the avg-pool when strided)
                conv(out_size, block_in, width, 1)
            conv(size, block_in, mid, 1)
            conv(size, mid, mid, 3, stride=block_stride, groups=groups)
            conv(out_size, mid, mid, 3, groups=groups)
            conv(out_size, mid, width, 1)
            hidden = max(1, int(width * spec.se_ratio))
            parts["rest" if index == 0 else "scanned_se"] += 2.0 * 2 * width * hidden  # on the pooled vector
            size = out_size
        in_ch = width
    part = "rest"
    if final_conv:
        conv(size, in_ch, in_ch * spec.final_conv_mult, 1)
    return parts


def vit_forward_flops(cfg: FlamingoConfig, image_size: int) -> tuple[float, float]:
    """(weight matmuls, attention matmuls) of one ViT image."""
    vit = cfg.vision.vit
    patches = (image_size // vit.patch_size) ** 2
    tokens = patches + (1 if vit.include_class_token else 0)
    width, hidden = vit.width, int(vit.width * vit.mlp_ratio)
    weights = 2.0 * patches * vit.patch_size**2 * 3 * width
    weights += vit.num_layers * (2.0 * tokens * width * width * 4 + 2.0 * 2 * tokens * width * hidden)
    attention = vit.num_layers * 2.0 * 2 * tokens * tokens * width
    return weights, attention


def vision_tokens(cfg: FlamingoConfig, image_size: int) -> tuple[int, int]:
    """(tokens per frame, feature width) that the encoder hands to the Resampler."""
    if cfg.vision.encoder == "vit":
        return (image_size // cfg.vision.vit.patch_size) ** 2, cfg.vision.vit.width
    spec = nfnet_spec(cfg.vision.nfnet)
    grid = image_size
    for stride in (2, 2, *spec.strides):
        grid = -(-grid // stride)
    width = spec.widths[-1] * (spec.final_conv_mult if cfg.vision.nfnet.final_conv else 1)
    return grid * grid, width


def _batch_flops(cfg: FlamingoConfig, shape: BatchShape, num_microbatches: int) -> dict[str, ComponentFlops]:
    # Remat: 'full' recomputes every matmul the backward needs an operand or
    # output of; 'dots_no_batch' only those with batch dimensions (attention).
    full = cfg.remat_policy == "full"
    batched = cfg.remat_policy in ("full", "dots_no_batch")
    image_size = shape.image_size or cfg.vision.image_size
    B, L = shape.batch_size, shape.seq_len
    items = B * shape.num_media  # media items (an image is a one-frame video)
    frames = items * shape.num_frames
    out = {}

    # Vision encoder: frozen, forward only, outside any remat.
    if cfg.vision.encoder == "nfnet":
        per_frame = nfnet_forward_flops(nfnet_spec(cfg.vision.nfnet), image_size, cfg.vision.nfnet.final_conv)
        vit_attention = 0.0
    else:
        per_frame, vit_attention = vit_forward_flops(cfg, image_size)
    out["vision_encoder"] = ComponentFlops(forward=frames * per_frame)
    attention = ComponentFlops(forward=frames * vit_attention)

    # Perceiver Resampler, per media item: T*S features -> R latents. Trainable: 3x,
    # but its input projection's input is stop_gradient (weight gradients only: 2x).
    r = cfg.resampler
    patches, media_dim = vision_tokens(cfg, image_size)
    features, latents, inner = shape.num_frames * patches, r.num_latents, r.num_heads * r.head_dim
    projection = items * 2.0 * features * media_dim * r.dim if media_dim != r.dim else 0.0
    ffw_out = items * r.num_layers * 2.0 * latents * r.ffw_mult * r.dim * r.dim
    layers_fwd = items * r.num_layers * (
        2.0 * latents * r.dim * inner  # query
        + 2 * 2.0 * (features + latents) * r.dim * inner  # key, value over concat(features, latents)
        + 2.0 * latents * inner * r.dim  # out
        + 2.0 * latents * r.dim * r.ffw_mult * r.dim) + ffw_out  # ffw
    scores = items * r.num_layers * 2.0 * latents * (features + latents) * inner  # = the value matmul's
    out["resampler"] = ComponentFlops(projection + layers_fwd, projection + 2 * layers_fwd,
                                      (layers_fwd - ffw_out) if full else 0.0)
    attention += ComponentFlops(2 * scores, 4 * scores, 2 * scores if batched else 0.0)

    # GATED XATTN-DENSE blocks: trainable (3x), text queries over M*R visual tokens.
    # Remat recomputes all of a block: the tanh gates' gradients need its outputs.
    x, d = cfg.xattn, cfg.decoder
    blocks, visual_tokens, inner = cfg.num_xattn_blocks, shape.num_media * r.num_latents, x.num_heads * x.head_dim
    xattn_fwd = blocks * (
        2.0 * B * L * d.dim * inner  # query
        + 2 * 2.0 * B * visual_tokens * r.dim * inner  # key, value of the visual tokens
        + 2.0 * B * L * inner * d.dim  # out
        + 2 * 2.0 * B * L * d.dim * cfg.xattn_ffw_hidden)  # ffw
    scores = blocks * 2.0 * B * L * visual_tokens * inner
    out["xattn"] = ComponentFlops(xattn_fwd, 2 * xattn_fwd, xattn_fwd if full else 0.0)
    attention += ComponentFlops(2 * scores, 4 * scores, 2 * scores if batched else 0.0)

    # Frozen LM layers: activation gradients only (1x). The FFW output projection is
    # never recomputed: only the layer's output, a saved scan carry, depends on it.
    heads, kv_heads = d.num_heads * d.head_dim, cfg.num_kv_heads * d.head_dim
    ffw_in = 2 if d.ffw == "swiglu" else 1
    ffw_out = d.num_layers * 2.0 * B * L * cfg.decoder_ffw_hidden * d.dim
    lm_fwd = d.num_layers * (2.0 * B * L * d.dim * (2 * heads + 2 * kv_heads)  # query, key, value, out
                             + ffw_in * 2.0 * B * L * d.dim * cfg.decoder_ffw_hidden) + ffw_out
    scores = d.num_layers * 2.0 * B * L * L * heads  # = the value matmul's
    relative_projection = relative_scores = 0.0
    if d.positions == "relative":  # W_r on the [L, D] distance table (once per call), and q . r
        # The table depends only on frozen weights and is computed before the layer scan, so
        # it has no backward and no recompute.
        relative_projection = d.num_layers * num_microbatches * 2.0 * L * d.dim * heads
        relative_scores = scores
    out["lm"] = ComponentFlops(lm_fwd + relative_projection, lm_fwd, (lm_fwd - ffw_out) if full else 0.0)
    # The values matmul's output feeds only the output projection: with its input
    # saved ('dots_no_batch') it is not recomputed.
    attention += ComponentFlops(2 * scores + relative_scores, 4 * scores + relative_scores,
                                (scores + relative_scores) * batched + scores * full)
    out["attention"] = attention

    # Logits: frozen (tied) vocabulary plus the trainable new-token rows.
    frozen_logits = 2.0 * B * L * d.dim * d.vocab_size
    new_logits = 2.0 * B * L * d.dim * cfg.num_new_tokens
    out["logits"] = ComponentFlops(frozen_logits + new_logits, frozen_logits + 2 * new_logits)
    return out


def step_flops(cfg: FlamingoConfig, batches: Mapping[str, BatchShape], num_microbatches: int = 1) -> StepFlops:
    """Analytic FLOPs of one train step over `batches` ({dataset: BatchShape}).

    Micro-batches leave the batch-proportional FLOPs unchanged; only the
    per-call terms (Transformer-XL's projection of the distance table) repeat."""
    parts = [_batch_flops(cfg, shape, num_microbatches) for shape in batches.values()]
    return StepFlops(**{name: sum((p[name] for p in parts), ComponentFlops()) for name in parts[0]})


def contrastive_step_flops(cfg: FlamingoConfig, text: TextEncoderConfig,
                           batches: Mapping[str, BatchShape]) -> ContrastiveStepFlops:
    """Analytic FLOPs of one contrastive pretraining step (appendix B.1.3; `models.dual_encoder`)
    over `batches` ({dataset: BatchShape}; one media item per pair, its frames pooled).

    Both towers train: every weight matmul runs 3x its forward, except the first one of the
    vision encoder (the image needs no gradient: 2x) and NFNet's other strided convolutions
    (their input gradient, over the stride-dilated output gradient, counts stride^2 x);
    attention's and the similarity matrix's matmuls 3x (both operands are activations). Remat ('full') recomputes the forward of every
    scanned block (each NFNet stage after its first block, ViT and text layers) but the FFW
    output projections of the Transformer layers (only the layer output, a saved scan carry,
    depends on them); 'dots_no_batch' recomputes the NFNet blocks' convolutions and the layers'
    attention; 'dots' and 'none' nothing."""
    policy = cfg.remat_policy
    full, batched = policy == "full", policy in ("full", "dots_no_batch")
    out = dict(vision_encoder=ComponentFlops(), text_encoder=ComponentFlops(), attention=ComponentFlops(),
               heads=ComponentFlops())
    inner, hidden = text.num_heads * text.head_dim, text.mlp_ratio * text.dim
    for shape in batches.values():
        image_size = shape.image_size or cfg.vision.image_size
        B, L, frames = shape.batch_size, shape.seq_len, shape.batch_size * shape.num_frames
        if cfg.vision.encoder == "nfnet":
            nf = _nfnet_forward_parts(nfnet_spec(cfg.vision.nfnet), image_size, cfg.vision.nfnet.final_conv)
            extra = nf.pop("strided_input_gradient_extra")
            forward = sum(nf.values())
            recompute = nf["scanned_convs"] * batched + nf["scanned_se"] * full
            vision = ComponentFlops(forward, 2 * forward - nf["first_conv"] + extra, recompute).scaled(frames)
            vision_attention = ComponentFlops()
        else:
            vit = cfg.vision.vit
            weights, scores = vit_forward_flops(cfg, image_size)  # scores: the score and value matmuls
            patches = (image_size // vit.patch_size) ** 2
            tokens = patches + (1 if vit.include_class_token else 0)
            patch_embed = 2.0 * patches * vit.patch_size**2 * 3 * vit.width
            mlp_out = vit.num_layers * 2.0 * tokens * int(vit.width * vit.mlp_ratio) * vit.width
            vision = ComponentFlops(weights, 2 * weights - patch_embed,
                                    (weights - patch_embed - mlp_out) * full).scaled(frames)
            vision_attention = ComponentFlops(scores, 2 * scores, scores * batched).scaled(frames)
        out["vision_encoder"] += vision
        tokens = B * L
        text_forward = text.num_layers * (4 * 2.0 * tokens * text.dim * inner + 2 * 2.0 * tokens * text.dim * hidden)
        mlp_out = text.num_layers * 2.0 * tokens * hidden * text.dim
        out["text_encoder"] += ComponentFlops(text_forward, 2 * text_forward, (text_forward - mlp_out) * full)
        scores = text.num_layers * 2 * 2.0 * B * L * L * inner  # scores and values
        out["attention"] += vision_attention + ComponentFlops(scores, 2 * scores, scores * batched)
        _, media_dim = vision_tokens(cfg, image_size)
        heads = 2.0 * B * (media_dim + text.dim) * text.embed_dim + 2.0 * B * B * text.embed_dim
        out["heads"] += ComponentFlops(heads, 2 * heads)
    return ContrastiveStepFlops(**out)


def decode_step_flops(cfg: FlamingoConfig, batch: int, num_slots: int, num_media: int) -> float:
    """Matmul FLOPs of one decoding step (one new token per row) against a KV cache of
    `num_slots` slots and `num_media` media items whose xattn keys/values were projected at
    prefill. Per LM layer: the token's q/k/v/out projections and FFW, and attention over every
    slot (scores and values); Transformer-XL adds its position term q . r over the slots, with
    the projected distance table computed once per prompt, so nothing here costs
    slots x width x width. Per xattn block: query, out and FFW on the token and attention over
    the visual tokens. Then the logits."""
    d = cfg.decoder
    heads, kv_heads = d.num_heads * d.head_dim, cfg.num_kv_heads * d.head_dim
    ffw_in = 2 if d.ffw == "swiglu" else 1
    projections = 2.0 * d.dim * (2 * heads + 2 * kv_heads) + (ffw_in + 1) * 2.0 * d.dim * cfg.decoder_ffw_hidden
    attention = 2 * 2.0 * num_slots * heads + (2.0 * num_slots * heads if d.positions == "relative" else 0.0)
    inner = cfg.xattn.num_heads * cfg.xattn.head_dim
    visual_tokens = num_media * cfg.resampler.num_latents
    xattn = (2.0 * d.dim * inner * 2 + 2 * 2.0 * d.dim * cfg.xattn_ffw_hidden  # query, out, ffw
             + 2 * 2.0 * visual_tokens * inner)  # scores and values
    logits = 2.0 * d.dim * cfg.total_vocab
    return batch * (d.num_layers * (projections + attention) + cfg.num_xattn_blocks * xattn + logits)


def human(flops: float) -> str:
    """1.23e15 -> '1.23 PFLOP'."""
    if flops <= 0:
        return "0 FLOP"
    exponent = min(int(math.log10(flops) // 3), 6)
    return f"{flops / 10 ** (3 * exponent):.3g} {['', 'k', 'M', 'G', 'T', 'P', 'E'][exponent]}FLOP"


# ------------------------------------------------------------------ traced count


def traced_flops(fn, *args, **kwargs) -> float:
    """Matmul and convolution FLOPs of the program JAX traces for `fn(*args)`,
    with every `scan` body counted `length` times.

    The check on the analytic count, and on XLA's: `compiled.cost_analysis()`
    counts the body of a while loop once whatever its trip count, so a model
    that scans its layers reports about one layer's FLOPs. Arguments may be
    `jax.ShapeDtypeStruct`s; nothing is compiled or run."""
    import jax

    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def jaxpr_flops(jaxpr) -> float:
    """`traced_flops` of a jaxpr (e.g. `jax.jit(f).trace(...).jaxpr.jaxpr`)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contracting)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # per output element: kernel window x input features per group
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / rhs[out_feature_dim]
        else:
            inner = [jaxpr_flops(sub) for sub in _sub_jaxprs(eqn.params)]
            if name == "scan":
                total += eqn.params["length"] * sum(inner)
            elif name == "cond":
                total += max(inner, default=0.0)
            else:  # pjit, remat, custom_jvp/vjp, while (unknown trip count: once), ...
                total += sum(inner)
    return total


def _sub_jaxprs(params: Mapping[str, Any]):
    from jax.extend import core

    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, core.Jaxpr):
                yield item
