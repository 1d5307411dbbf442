"""One image decoder and one policy: odd files decode to the expected pixels or are refused with
their reason, and training (tf.data) and inference (MediaLoader) turn the same bytes into the same array."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from flamingo_jax.data import formats, images, pairs
from flamingo_jax.inference.items import Media
from flamingo_jax.inference.prompting import MediaLoader

from test_data_utils import collect, make_tokenizer, rows

CONFIG = images.ImageConfig(size=16, random_flip=False, color_jitter=False)
BACKGROUND = np.asarray(CONFIG.background)


def png(width: int, height: int, bit_depth: int, colour_type: int, pixels: bytes, rows_: int | None = None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour): `pixels` is one row's bytes, repeated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    data = zlib.compress((b"\x00" + pixels) * (height if rows_ is None else rows_))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def solid(height, width, rgb):
    return np.broadcast_to(np.asarray(rgb, np.uint8), (height, width, 3))


def palette_with_transparency() -> bytes:
    image = Image.new("P", (6, 4))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (3, 0, 6, 4))  # right half: index 1, declared transparent
    return encoded(image, "PNG", transparency=1)


def palette_expected():
    expected = np.zeros((4, 6, 3), np.uint8)
    expected[:, :3] = (255, 0, 0)
    expected[:, 3:] = BACKGROUND
    return expected


def exif_rotated() -> bytes:
    pixels = np.zeros((4, 8, 3), np.uint8)
    pixels[:, :4] = (255, 0, 0)
    pixels[:, 4:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    return encoded(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)


def animated_gif() -> bytes:
    frames = [Image.fromarray(solid(4, 4, rgb).copy()) for rgb in ((255, 0, 0), (0, 0, 255))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


def jpeg(rgb=(200, 60, 30)) -> bytes:
    return images.encode_image(solid(12, 16, rgb).copy(), "JPEG", quality=95)


RGBA_ALPHA = 128
# name -> (bytes, expected uint8 [H, W, 3] (approximate for lossy JPEG: tolerance), or the refusal reason)
CASES = {
    "truncated JPEG": (lambda: jpeg()[:300], "corrupt_image"),
    "zero bytes": (lambda: b"", "corrupt_image"),
    "not an image": (lambda: b"<html>404 not found</html>", "corrupt_image"),
    "CMYK JPEG": (lambda: encoded(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG", quality=95),
                  (solid(6, 8, (255, 0, 0)), 3)),
    "greyscale PNG": (lambda: images.encode_image(np.full((6, 8), 77, np.uint8), "PNG"), (solid(6, 8, (77,) * 3), 0)),
    "palette PNG with transparency": (palette_with_transparency, (palette_expected(), 0)),
    "RGBA PNG half transparent": (
        lambda: encoded(Image.new("RGBA", (5, 3), (255, 0, 0, RGBA_ALPHA)), "PNG"),
        (solid(3, 5, (np.asarray([255, 0, 0]) * RGBA_ALPHA + BACKGROUND * (255 - RGBA_ALPHA) + 127) // 255), 0)),
    "16-bit RGB PNG": (lambda: png(5, 3, 16, 2, struct.pack(">HHH", 1000, 30000, 65535) * 5),
                       (solid(3, 5, (1000 >> 8, 30000 >> 8, 255)), 0)),
    "16-bit greyscale PNG": (lambda: png(5, 3, 16, 0, struct.pack(">H", 40000) * 5),
                             (solid(3, 5, (40000 >> 8,) * 3), 0)),
    "extreme aspect ratio 4000x3": (lambda: images.encode_image(solid(3, 4000, (90, 180, 30)).copy(), "PNG"),
                                    (solid(3, 4000, (90, 180, 30)), 0)),
    "EXIF orientation": (exif_rotated, None),  # checked below: 8 high, 4 wide, red on top
    "animated GIF": (animated_gif, (solid(4, 4, (255, 0, 0)), 0)),
    "float pixels (TIFF, mode F)": (lambda: encoded(Image.new("F", (4, 4), 0.5), "TIFF"), "corrupt_image"),
    "decompression bomb (100000 x 100000 header)": (lambda: png(100_000, 100_000, 8, 0, b"\x00" * 16, rows_=1),
                                                    "image_too_large"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_odd_image_decodes_as_the_policy_says_or_is_refused_with_its_reason(name):
    build, expected = CASES[name]
    data = build()
    if isinstance(expected, str):
        with pytest.raises(images.ImageDecodeError) as error:
            images.decode_pixels(data, CONFIG.background, CONFIG.max_pixels)
        assert error.value.reason == expected
        return
    pixels = images.decode_pixels(data, CONFIG.background, CONFIG.max_pixels)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[-1] == 3
    if expected is None:  # EXIF orientation 6: the 8x4 picture is shown 4 wide, 8 high, its left (red) on top
        assert pixels.shape == (8, 4, 3)
        assert np.abs(pixels[1, 2].astype(int) - (255, 0, 0)).max() < 40
        assert np.abs(pixels[6, 2].astype(int) - (0, 0, 255)).max() < 40
        return
    array, tolerance = expected
    assert pixels.shape == array.shape
    assert np.abs(pixels.astype(int) - array.astype(int)).max() <= tolerance


def test_the_pixel_limit_refuses_images_before_decoding():
    data = images.encode_image(np.zeros((40, 40, 3), np.uint8), "PNG")
    assert images.decode_pixels(data, max_pixels=1600).shape == (40, 40, 3)
    with pytest.raises(images.ImageDecodeError, match="40x40 = 1600 pixels > max_pixels=1000") as error:
        images.decode_pixels(data, max_pixels=1000)
    assert error.value.reason == "image_too_large"


def test_training_and_inference_prepare_the_same_bytes_identically(tmp_path):
    names = ["16-bit greyscale PNG", "palette PNG with transparency", "CMYK JPEG", "RGBA PNG half transparent",
             "16-bit RGB PNG", "extreme aspect ratio 4000x3", "EXIF orientation", "greyscale PNG"]
    refused = ["truncated JPEG", "decompression bomb (100000 x 100000 header)"]
    with formats.ImageTextWriter(str(tmp_path), "odd", 1) as writer:
        for name in names + refused:
            data = CASES[name][0]()
            (tmp_path / f"{len(list(tmp_path.glob('*.img')))}.img").write_bytes(data)
            writer.write(data, f"a picture: {name}")
    tok = make_tokenizer(str(tmp_path))
    pipeline = pairs.ImageTextPipeline(str(tmp_path / "odd-*"), 1, tok, config=pairs.PairConfig(max_len=24),
                                       image_config=CONFIG, training=False, num_epochs=1, process_index=0,
                                       process_count=1)
    trained = [example["media"][0, 0] for example in rows(collect(pipeline))]
    assert {k: v for k, v in pipeline.skip_counts().items() if v} == {"corrupt_image": 1, "image_too_large": 1}
    loader = MediaLoader(CONFIG, num_frames=1)
    assert len(trained) == len(names)
    for i, (name, from_training) in enumerate(zip(names, trained, strict=True)):
        from_inference = loader(Media(path=tmp_path / f"{i}.img"))[0]
        np.testing.assert_array_equal(from_training, from_inference, err_msg=name)
    grey = images.denormalize(trained[0], CONFIG)
    assert (grey[4:12, 4:12] == 40000 >> 8).all()  # neither clipped to white nor halved to mid-grey
    strip = trained[names.index("extreme aspect ratio 4000x3")]
    assert strip.shape == (16, 16, 3) and np.abs(strip[7]).min() > 0 and not np.delete(strip, 7, axis=0).any()
