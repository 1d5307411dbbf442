"""Images: one decoder for training and inference, then fit, pad with the mean, normalise, augment.

The paper (appendix B.1.2) trains at 320x320 "keeping the aspect ratio and
padding with the mean", with inputs normalised to zero mean and unit variance,
and uses flips and colour augmentation on paired data. Here:
  1. decode with `decode_pixels` (Pillow) to uint8 RGB, the one policy below;
     the pipelines call it in their per-record Python step (`decode_all`),
     inference calls it directly, so the same bytes give the same pixels;
  2. resize (bilinear, antialiased) so the LONG side equals `size` (an extreme
     aspect ratio keeps at least one pixel on the short side);
  3. training only: colour jitter (brightness, contrast, saturation) and a
     random horizontal flip, from a stateless seed (deterministic, resumable);
  4. normalise per channel, x = (pixel / 255 - mean) / std;
  5. pad to `size` x `size`, centred, with zeros, i.e. with the mean colour.

Default constants are CLIP's (OpenAI CLIP / open_clip), which suit both the
CLIP ViT encoder and an NFNet trained contrastively on similar web data:
  mean = (0.48145466, 0.4578275, 0.40821073), std = (0.26862954, 0.26130258, 0.27577711).
ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) are in IMAGENET_MEAN/STD.
Use the constants the frozen encoder's weights were trained with.

Decoding policy (`decode_pixels`): every image becomes uint8 RGB [H, W, 3], or
is refused with a reason of DECODE_FAILURES (the pipelines skip and count it):
  * 8-bit RGB, greyscale (1, L), palette (P), CMYK (Adobe-inverted JPEGs
    included), YCbCr: Pillow's conversion to RGB (a mode it cannot convert,
    such as LAB, is refused);
  * 16-bit samples (I;16 greyscale, 16-bit RGB/RGBA PNG): the high byte, the
    same reduction Pillow applies to 16-bit colour PNGs (so 16-bit grey is not
    clipped to white, as `convert("RGB")` alone does); 32-bit integer greyscale
    (I) is taken as 16-bit; float pixels (F) are refused, their range is unknown;
  * transparency (RGBA, LA, PA, a palette or a colour with a transparent
    entry): composited onto the mean colour, the colour of the padding, so a
    transparent area reads as "no image" to the model;
  * EXIF orientation is applied (phone photos are stored rotated; captions
    describe them as displayed); a broken EXIF block is ignored;
  * animations: the first frame;
  * refused: empty or unreadable bytes, truncated files (a half-grey JPEG is
    not a picture of its caption), float pixels (`corrupt_image`); more than
    `max_pixels` pixels, checked from the header before decoding, against
    decompression bombs (`image_too_large`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from flamingo_jax.data._tf import tf

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 8192 * 8192  # default decode limit; Pillow's own bomb warning starts above 89 M pixels
DECODE_FAILURES = ("corrupt_image", "image_too_large")  # the reasons `decode_pixels` refuses an image


class ImageDecodeError(ValueError):
    """An image the decoding policy refuses; `reason` is one of DECODE_FAILURES."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """How images become model inputs. Augmentation applies only when training."""

    size: int = 320
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # Flips break data whose text names left and right (the synthetic corpus does); turn off there.
    random_flip: bool = True
    color_jitter: bool = True
    brightness: float = 0.1  # max additive change on the [0, 1] scale
    contrast: float = 0.1  # contrast factor drawn from [1 - c, 1 + c]
    saturation: float = 0.1  # saturation factor drawn from [1 - s, 1 + s]
    # Larger images are refused before decoding (decompression bombs). Above Pillow's own limit
    # (PIL.Image.MAX_IMAGE_PIXELS, 89 M) Pillow warns, and above twice that it refuses first.
    max_pixels: int = MAX_PIXELS

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"image size {self.size} must be a positive number of pixels (e.g. 320).")
        if self.max_pixels < 1:
            raise ValueError(f"image max_pixels={self.max_pixels} must be >= 1 (default {MAX_PIXELS}).")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"image mean {self.mean} and std {self.std} need 3 values each (R, G, B).")
        if min(self.std) <= 0:
            raise ValueError(f"image std {self.std} must be positive per channel.")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"colour jitter `{name}`={getattr(self, name)} must be in [0, 1).")

    @property
    def background(self) -> tuple[int, int, int]:
        """The mean colour as uint8 RGB: what transparent pixels become (the padding colour)."""
        return tuple(int(round(255 * m)) for m in self.mean)


# ---------------------------------------------------------------- decoding
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def decode_pixels(data: bytes, background: tuple[int, int, int] = (0, 0, 0),
                  max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image -> uint8 [H, W, 3] by the policy of the module docstring.

    Raises ImageDecodeError (reason in DECODE_FAILURES) for an image the policy refuses.
    `background` is the colour transparent pixels are composited onto.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("corrupt_image", "empty image (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError("image_too_large", f"{width}x{height} = {width * height} pixels > "
                                                      f"max_pixels={max_pixels} (a decompression bomb?)")
        image.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as error:
        raise ImageDecodeError("corrupt_image", f"not an image format Pillow reads (starts {data[:8]!r})") from error
    except Image.DecompressionBombError as error:
        raise ImageDecodeError("image_too_large", str(error)) from error
    except Exception as error:  # noqa: BLE001 - Pillow raises many types for bad data
        raise ImageDecodeError("corrupt_image", f"does not decode ({type(error).__name__}: {error})") from error
    if "exif" in image.info or image.format == "TIFF":  # where an orientation tag can be (saves parsing)
        try:
            ImageOps.exif_transpose(image, in_place=True)
        except Exception:  # noqa: BLE001 - a broken EXIF block is metadata, not a broken picture
            pass
    try:
        return _to_rgb(image, background)
    except ImageDecodeError:
        raise
    except Exception as error:  # noqa: BLE001 - e.g. a mode Pillow cannot convert to RGB
        raise ImageDecodeError("corrupt_image", f"mode {image.mode} does not convert to RGB ({error})") from error


def _to_rgb(image: Any, background: tuple[int, int, int]) -> np.ndarray:
    """A loaded Pillow image in any mode -> uint8 [H, W, 3] (the policy's conversions)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = (np.clip(np.asarray(image, np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode == "F":
        raise ImageDecodeError("corrupt_image", "32-bit float pixels (mode F) have no known range; "
                                                "store 8- or 16-bit images")
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), np.uint32)
        alpha = rgba[..., 3:]
        under = np.asarray(background, np.uint32)
        return ((rgba[..., :3] * alpha + under * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), np.uint8)


def _fit_long_side(image: Any, size: int) -> Any:
    """uint8 [h, w, 3] -> float32 [h', w', 3] in [0, 255], max(h', w') = size, ratio kept."""
    t = tf()
    shape = t.cast(t.shape(image)[:2], t.float32)
    scale = size / t.reduce_max(shape)
    new_shape = t.maximum(t.cast(t.round(shape * scale), t.int32), 1)
    return t.image.resize(image, new_shape, method="bilinear", antialias=True)


def _augment(image01: Any, config: ImageConfig, seed: Any) -> Any:
    """Colour jitter and flip on a [0, 1] image, all draws from `seed` [2]."""
    t = tf()
    if config.color_jitter:
        seeds = t.random.experimental.stateless_split(seed, 4)
        if config.brightness:
            image01 = t.image.stateless_random_brightness(image01, config.brightness, seeds[0])
        if config.contrast:
            image01 = t.image.stateless_random_contrast(image01, 1 - config.contrast, 1 + config.contrast, seeds[1])
        if config.saturation:
            image01 = t.image.stateless_random_saturation(
                image01, 1 - config.saturation, 1 + config.saturation, seeds[2])
        image01 = t.clip_by_value(image01, 0.0, 1.0)
        seed = seeds[3]
    if config.random_flip:
        image01 = t.image.stateless_random_flip_left_right(image01, seed)
    return image01


def preprocess_pixels(image: Any, config: ImageConfig, training: bool, seed: Any) -> Any:
    """uint8 pixels [h, w, 3] -> float32 [size, size, 3]: steps 2-5 of the module docstring.

    Training (`prepare_decoded`) and inference (`MediaLoader`) both call it, so
    an image is prepared the same way on both paths."""
    t = tf()
    # Products with reciprocals, not divisions by constants: traced (`inference_preprocessor`),
    # Grappler rewrites x / c as x * (1 / c), which rounds differently from eager and tf.data.
    image01 = _fit_long_side(image, config.size) * (1.0 / 255.0)
    if training:
        image01 = _augment(image01, config, seed)
    normalised = (image01 - t.constant(config.mean)) * t.constant([1.0 / s for s in config.std])
    height, width = t.shape(normalised)[0], t.shape(normalised)[1]
    padded = t.image.pad_to_bounding_box(
        normalised, (config.size - height) // 2, (config.size - width) // 2, config.size, config.size)
    return t.ensure_shape(padded, [config.size, config.size, 3])


@functools.lru_cache(maxsize=8)
def inference_preprocessor(config: ImageConfig) -> Any:
    """`preprocess_pixels` at inference, as one traced TensorFlow function (any image size), equal
    to it bit for bit: called eagerly it runs some forty ops one by one, 5 ms an image on one
    core against 0.9 ms traced, which made reading a 30-frame clip cost more than encoding it."""
    t = tf()

    def prepare(pixels):
        return preprocess_pixels(pixels, config, training=False, seed=None)

    return t.function(prepare, input_signature=[t.TensorSpec([None, None, 3], t.uint8)], autograph=False)


def decode_all(encoded: Sequence[bytes], config: ImageConfig) -> tuple[np.ndarray, np.ndarray, str, str]:
    """A record's images for the pipelines' Python step: `decode_pixels` of each.

    Returns (pixels uint8 [sum of H * W * 3], the images one after the other;
    shapes int32 [K, 2], (H, W) of each; reason, detail): reason is "" when
    every image decoded, else the first refused image's (then no pixels).
    One flat buffer, because tf.numpy_function returns arrays of fixed rank.
    """
    decoded = []
    for data in encoded:
        try:
            decoded.append(decode_pixels(data, config.background, config.max_pixels))
        except ImageDecodeError as error:
            return np.zeros([0], np.uint8), np.zeros([0, 2], np.int32), error.reason, str(error)
    shapes = np.array([image.shape[:2] for image in decoded], np.int32).reshape(-1, 2)
    pixels = np.concatenate([image.reshape(-1) for image in decoded]) if decoded else np.zeros([0], np.uint8)
    return pixels, shapes, "", ""


def prepare_decoded(pixels: Any, shapes: Any, config: ImageConfig, training: bool, seed: Any,
                    same_augmentation: bool = False) -> Any:
    """`decode_all`'s output in the graph -> float32 [K, S, S, 3], each by `preprocess_pixels`.

    pixels: uint8 [N]; shapes: int32 [K, 2]; seed: int64 [2]. With
    `same_augmentation` every image gets the same flip/jitter (video frames).
    """
    t = tf()
    shapes = t.reshape(shapes, [-1, 2])
    count = t.shape(shapes, out_type=t.int64)[0]
    if not training:
        seeds = t.zeros([count, 2], t.int64)
    elif same_augmentation:
        seeds = t.tile(t.reshape(t.cast(seed, t.int64), [1, 2]), [count, 1])
    else:
        seeds = t.cast(t.random.experimental.stateless_split(seed, num=count), t.int64)
    sizes = shapes[:, 0] * shapes[:, 1] * 3
    starts = t.cumsum(sizes, exclusive=True)

    def one(args):
        start, size, shape, image_seed = args
        image = t.reshape(t.slice(pixels, [start], [size]), [shape[0], shape[1], 3])
        return preprocess_pixels(image, config, training, image_seed)

    prepared = t.map_fn(one, (starts, sizes, shapes, seeds),
                        fn_output_signature=t.TensorSpec([config.size, config.size, 3], t.float32))
    return t.ensure_shape(prepared, [None, config.size, config.size, 3])


# ---------------------------------------------------------------- numpy helpers
def encode_image(array: np.ndarray, format: str = "JPEG", quality: int = 95) -> bytes:
    """uint8 [H, W, 3] (or [H, W]) -> encoded bytes, for writers, tests and the synthetic corpus."""
    from PIL import Image

    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"encode_image expects uint8 pixels, got {array.dtype}; convert with np.uint8 first.")
    buffer = io.BytesIO()
    options = {"quality": quality} if format.upper() in ("JPEG", "JPG") else {}
    Image.fromarray(array).save(buffer, format=format, **options)
    return buffer.getvalue()


def denormalize(images: np.ndarray, config: ImageConfig) -> np.ndarray:
    """Model-input images [..., 3] -> uint8 pixels (for looking at batches)."""
    pixels = (np.asarray(images) * np.asarray(config.std) + np.asarray(config.mean)) * 255.0
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)
