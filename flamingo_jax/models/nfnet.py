"""NFNet-F: the frozen, normaliser-free ResNet that Flamingo uses as its vision encoder.

Brock, De, Smith, Simonyan 2021, "High-Performance Large-Scale Image Recognition
Without Normalization" (arXiv 2102.06171). Flamingo pretrains an NFNet-F6
contrastively and freezes it; here it maps images [B, H, W, 3] (normalised with
the ImageNet mean and std, as NFNet's input pipeline does) to the final stage's
spatial grid flattened to a sequence [B, (H/32)*(W/32), C].

The parts that replace batch norm, and why:

* `WSConv2D`: scaled weight standardisation. Each output channel's kernel is
  standardised over its fan-in and scaled by 1/sqrt(fan_in), so a conv maps a
  unit-variance input to a unit-variance output whatever the weights.
* `scaled_gelu`: GELU times gamma=1.7015..., which gives the activation's
  output unit second moment for a unit-normal input.
* Residual blocks compute `x + alpha * skip_gain * f(beta * act(x))` with
  beta = 1/expected_std(x). The variance of the residual stream grows by alpha^2
  per block and is reset to 1 at each stage's first (transition) block, whose
  shortcut is a 1x1 conv of the beta-scaled input, so beta is known analytically.
* `skip_gain` (SkipInit) is a learned scalar initialised to 0.

Everything is `layers.Frozen`. No classifier head; stochastic depth and dropout
are training-time regularisers of the pretraining run and are omitted (the
encoder only ever runs at inference).

Depth does not grow the program: in each stage the transition block is a module
of its own and the remaining identical blocks are stacked ('layers' axis) and run
with `layers.scan_stack`; their betas differ only as numbers, fed in as scan xs.

Variable names follow the DeepMind haiku code (stem_conv0..3, conv0, conv1,
conv1b, conv2, conv_shortcut, se fc0/fc1, skip_gain, final_conv; WSConv2D
`kernel` = haiku `w` [kh, kw, in/groups, out], `gain`, `bias`), so a converter is
a renaming plus stacking the non-transition blocks of each stage
(`flamingo_jax/convert/timm_nfnet.py` maps timm's `dm_nfnet_*`).

Two numerical details differ between DeepMind's code (the defaults here) and
timm's port of its weights, and are switches of `NFNetConfig`: the GELU (tanh
approximation vs erf) and where weight standardisation's epsilon goes
(`max(fan_in * var, eps)` vs `fan_in * (var + eps)`). Padding is 'SAME' in both.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax.models import layers
from flamingo_jax.models.config import NFNetConfig, NFNetSpec, nfnet_spec

Array = jax.Array

# E[gelu(z)^2]^-1/2 for z ~ N(0, 1): makes the activation preserve the second moment.
GELU_GAMMA = 1.7015043497085571
CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def scaled_gelu(x: Array, approximate: bool = True) -> Array:
    """NFNet's activation: GELU times gamma; the tanh approximation as DeepMind's
    reference, or the erf GELU (`approximate=False`) as timm's port."""
    return jax.nn.gelu(x, approximate=approximate) * GELU_GAMMA


def bucketed_fan_in_init(fan_in: int):
    """`layers.fan_in_init` (truncated normal, std 1/sqrt(fan_in)) drawn through a
    flat buffer whose size is rounded up to a power of two.

    NFNet has dozens of distinct kernel shapes; created eagerly, each shape would
    compile its own threefry program (~0.3 s apiece on CPU). Drawing from a few
    bucket sizes and slicing compiles a handful instead: the tiny model builds in
    seconds rather than tens of seconds. The values are i.i.d. as before.
    """
    std = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype):
        size = math.prod(shape)
        bucket = max(1024, 1 << (size - 1).bit_length())
        z = jax.random.truncated_normal(key, -2.0, 2.0, (bucket,), jnp.float32)[:size]
        # 0.8796 is the std of a unit normal truncated to [-2, 2].
        return (z.reshape(shape) * (std / 0.87962566)).astype(dtype)

    return init


class WSConv2D(nnx.Module):
    """Conv with scaled weight standardisation, a learned per-channel gain and a bias.

    kernel_used = gain * (w - mean(w)) / sqrt(fan_in * var(w)), mean and var over
    the fan-in (kh, kw, in/groups) of each output channel; var * fan_in is floored
    at `eps` (eps_mode 'max', DeepMind's code), or `eps` is added to var
    (eps_mode 'add', timm's ScaledStdConv2d). The raw kernel is what is stored
    (as in the checkpoint, so loading is a copy) and standardised in fp32 on
    every call, which is cheap next to the convolution itself.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, groups: int = 1,
                 eps: float = 1e-4, eps_mode: str = "max", dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"WSConv2D: channels {in_ch}->{out_ch} are not divisible by groups={groups}")
        if eps_mode not in ("max", "add"):
            raise ValueError(f"WSConv2D: eps_mode {eps_mode!r} must be 'max' or 'add'")
        self.stride, self.groups, self.eps, self.eps_mode, self.dtype = stride, groups, eps, eps_mode, dtype
        shape = (kernel_size, kernel_size, in_ch // groups, out_ch)
        self.kernel = layers.make_variable(
            layers.Frozen, bucketed_fan_in_init(math.prod(shape[:-1])), rngs.params(), shape, param_dtype, CONV_AXES)
        # Constant inits take no key: every key drawn costs a PRNG hash when compiled.
        self.gain = layers.make_variable(layers.Frozen, layers.constant_init(1.0), None, (out_ch,), param_dtype,
                                         ("conv_out",))
        self.bias = layers.make_variable(layers.Frozen, nnx.initializers.zeros, None, (out_ch,), param_dtype,
                                         ("conv_out",))

    def standardized_kernel(self) -> Array:
        """The kernel the convolution uses, in fp32: [kh, kw, in/groups, out]."""
        w = self.kernel[...].astype(jnp.float32)
        fan_in = math.prod(w.shape[:-1])
        mean = w.mean(axis=(0, 1, 2), keepdims=True)
        var = w.var(axis=(0, 1, 2), keepdims=True)
        if self.eps_mode == "max":
            inv_std = jax.lax.rsqrt(jnp.maximum(var * fan_in, self.eps))
        else:
            inv_std = jax.lax.rsqrt((var + self.eps) * fan_in)
        scale = inv_std * self.gain[...].astype(jnp.float32)
        return (w - mean) * scale

    def __call__(self, x: Array) -> Array:
        """x [B, H, W, in] -> [B, ceil(H/stride), ceil(W/stride), out] ('SAME' padding)."""
        kernel = self.standardized_kernel().astype(self.dtype)
        if kernel.shape[:2] == (1, 1) and self.stride == 1 and self.groups == 1:
            # A 1x1 convolution is a matmul over channels, and written as one the TPU compiler pads
            # nothing; as a convolution it pads the image width to its tile (F6's 20-wide third
            # stage at 320 px to 24 or 32): 1.09x the analytic FLOPs executed instead of 1.01x.
            y = jnp.einsum("bhwi,io->bhwo", x.astype(self.dtype), kernel[0, 0])
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(self.dtype), kernel, window_strides=(self.stride, self.stride), padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
        return y + self.bias[...].astype(self.dtype)


class SqueezeExcite(nnx.Module):
    """Channel gates from the spatial mean: sigmoid(fc1(relu(fc0(mean_hw(x)))))."""

    def __init__(self, channels: int, hidden: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(variable_type=layers.Frozen, rngs=rngs, use_bias=True, param_dtype=param_dtype, dtype=dtype)
        self.fc0 = layers.Dense(channels, hidden, axes=("conv_out", "se_hidden"),
                                kernel_init=bucketed_fan_in_init(channels), **kw)
        self.fc1 = layers.Dense(hidden, channels, axes=("se_hidden", "conv_out"),
                                kernel_init=bucketed_fan_in_init(hidden), **kw)

    def __call__(self, x: Array) -> Array:
        """x [B, H, W, C] -> gates [B, 1, 1, C] in (0, 1)."""
        pooled = x.astype(jnp.float32).mean(axis=(1, 2)).astype(x.dtype)  # [B, C]
        return jax.nn.sigmoid(self.fc1(jax.nn.relu(self.fc0(pooled))))[:, None, None, :]


class NFBlock(nnx.Module):
    """NF bottleneck block: 1x1 -> grouped 3x3 (strided) -> grouped 3x3 -> 1x1 -> SE.

    out = shortcut + alpha * skip_gain * residual(beta * act(x)). beta is passed
    at call time so that the blocks of a stage can share one scanned module.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int, spec: NFNetSpec, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        width = int(out_ch * spec.bottleneck_ratio)
        groups = width // spec.group_width
        width = groups * spec.group_width  # round down to whole groups, as the reference
        kw = dict(eps=spec.ws_epsilon, eps_mode=spec.ws_epsilon_mode, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
        se_kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.stride, self.alpha, self.approximate_gelu = stride, spec.alpha, spec.approximate_gelu
        self.conv0 = WSConv2D(in_ch, width, 1, **kw)
        self.conv1 = WSConv2D(width, width, 3, stride=stride, groups=groups, **kw)
        self.conv1b = WSConv2D(width, width, 3, groups=groups, **kw)
        self.conv2 = WSConv2D(width, out_ch, 1, **kw)
        # A 1x1 shortcut conv whenever the shape changes (every transition block of an F-variant).
        self.conv_shortcut = WSConv2D(in_ch, out_ch, 1, **kw) if stride > 1 or in_ch != out_ch else None
        self.se = SqueezeExcite(out_ch, max(1, int(out_ch * spec.se_ratio)), **se_kw)
        self.skip_gain = layers.make_variable(layers.Frozen, nnx.initializers.zeros, None, (), param_dtype, ())

    def __call__(self, x: Array, beta: Array | float) -> Array:
        """x [B, H, W, in] -> [B, H/stride, W/stride, out]."""
        act = functools.partial(scaled_gelu, approximate=self.approximate_gelu)
        out = act(x) * jnp.asarray(beta, x.dtype)  # ~unit variance
        if self.stride > 1:
            shortcut = nnx.avg_pool(out, (self.stride, self.stride), strides=(self.stride, self.stride),
                                    padding="SAME", count_include_pad=False)
            if self.conv_shortcut is not None:
                shortcut = self.conv_shortcut(shortcut)
        elif self.conv_shortcut is not None:
            shortcut = self.conv_shortcut(out)
        else:
            shortcut = x
        out = self.conv0(out)
        out = self.conv1(act(out))
        out = self.conv1b(act(out))
        out = self.conv2(act(out))
        out = 2.0 * self.se(out) * out  # x2 undoes the ~0.5 gate SE gives at init
        return shortcut + out * (self.alpha * self.skip_gain[...].astype(out.dtype))


class NFStage(nnx.Module):
    """One stage: a transition block, then `depth - 1` stacked identical blocks run by scan."""

    def __init__(self, in_ch: int, out_ch: int, *, depth: int, stride: int, betas: tuple[float, ...],
                 spec: NFNetSpec, dtype: Any, param_dtype: Any, rngs: nnx.Rngs, remat_policy: str = "none"):
        kw = dict(spec=spec, dtype=dtype, param_dtype=param_dtype)
        self.betas = tuple(float(b) for b in betas)
        self.remat_policy = remat_policy
        self.transition = NFBlock(in_ch, out_ch, stride=stride, rngs=rngs, **kw)
        self.blocks = (
            layers.stack_modules(lambda r: NFBlock(out_ch, out_ch, stride=1, rngs=r, **kw), depth - 1, rngs)
            if depth > 1 else None
        )

    def __call__(self, x: Array) -> Array:
        x = self.transition(x, self.betas[0])
        if self.blocks is None:
            return x
        graphdef, state = nnx.split(self.blocks)
        betas = jnp.asarray(self.betas[1:], jnp.float32)  # [depth - 1], one per scan step
        x, _ = layers.scan_stack(graphdef, state, lambda block, h, beta: (block(h, beta), None), x, betas,
                                 remat_policy=self.remat_policy)
        return x


class NFNet(nnx.Module):
    """NFNet-F encoder without classifier: images [B, H, W, 3] -> [B, (H/32)*(W/32), out_dim].

    With `cfg.final_conv` the last stage is followed by a 1x1 WSConv2D to
    `final_conv_mult` x its width and the activation (3072 channels for the
    F-variants), as the network feeds its pooled classifier; without it the
    tokens are the last stage's residual stream (`out_dim` = last width).
    `spec` overrides the architecture that `cfg` names (tests use it). `remat_policy` applies
    to each stage's scanned blocks: only a trained encoder (contrastive pretraining) needs one.
    """

    def __init__(self, cfg: NFNetConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs, spec: NFNetSpec | None = None, remat_policy: str = "none"):
        spec = nfnet_spec(cfg) if spec is None else spec
        self.spec, self.dtype = spec, dtype
        kw = dict(eps=spec.ws_epsilon, eps_mode=spec.ws_epsilon_mode, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
        stage_kw = dict(spec=spec, dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat_policy=remat_policy)
        s0, s1, s2, s3 = spec.stem_widths
        self.stem_conv0 = WSConv2D(3, s0, 3, stride=2, **kw)
        self.stem_conv1 = WSConv2D(s0, s1, 3, **kw)
        self.stem_conv2 = WSConv2D(s1, s2, 3, **kw)
        self.stem_conv3 = WSConv2D(s2, s3, 3, stride=2, **kw)
        stages, in_ch = [], s3
        for width, depth, stride, betas in zip(spec.widths, spec.depths, spec.strides, spec.stage_betas()):
            stages.append(NFStage(in_ch, width, depth=depth, stride=stride, betas=betas, **stage_kw))
            in_ch = width
        self.stages = nnx.List(stages)
        self.final_conv = WSConv2D(in_ch, in_ch * spec.final_conv_mult, 1, **kw) if cfg.final_conv else None
        self.out_dim = in_ch * spec.final_conv_mult if cfg.final_conv else in_ch
        # Every layer is a convolution, a pool or a per-image mean: images may be split along their
        # rows (`models.flamingo.encode_frames`), the output having rows / row_stride rows.
        self.row_stride = spec.total_stride

    def features(self, images: Array) -> Array:
        """Stem and stages, before the final conv: [B, H, W, 3] -> [B, H/32, W/32, last width]."""
        chex.assert_rank(images, 4)
        chex.assert_axis_dimension(images, 3, 3)
        act = functools.partial(scaled_gelu, approximate=self.spec.approximate_gelu)
        x = images.astype(self.dtype)
        x = act(self.stem_conv0(x))  # [B, H/2, W/2, s0]
        x = act(self.stem_conv1(x))
        x = act(self.stem_conv2(x))
        x = self.stem_conv3(x)  # [B, H/4, W/4, s3]; each block applies its own activation
        for stage in self.stages:
            x = stage(x)
        return x

    def __call__(self, images: Array) -> Array:
        """images [B, H, W, 3] -> tokens [B, (H/32)*(W/32), out_dim]."""
        x = self.features(images)  # [B, h, w, C]
        if self.final_conv is not None:
            x = scaled_gelu(self.final_conv(x), self.spec.approximate_gelu)  # [B, h, w, out_dim]
        batch, h, w, channels = x.shape
        return x.reshape(batch, h * w, channels)
