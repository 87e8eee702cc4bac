"""Checking, scaling and counting attached images (``modules/core/images.py``).

Every image is made here with Pillow (or, for the bombs, written byte by byte): each format, an
EXIF-rotated JPEG, an animation, a PNG declaring huge dimensions, a truncated PNG.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import pytest
from PIL import Image as PILImage

from modules.core import images
from modules.core.images import OPENAI_LIMIT, ImageProblem, for_model, image_tokens, inspect_image
from modules.providers import Image

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def encoded(image: PILImage.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def picture(width: int, height: int, mode: str = "RGB") -> PILImage.Image:
    """Top half red, bottom half blue: where they end up shows a rotation."""
    image = PILImage.new("RGB", (width, height), RED)
    image.paste(BLUE, (0, height // 2, width, height))
    return image.convert(mode)


def decoded(image: Image) -> PILImage.Image:
    opened = PILImage.open(io.BytesIO(image.data))
    opened.load()
    return opened


def near(pixel, colour, tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], colour))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` and whose data is a few bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + chunk(b"IEND", b"")


def reason(data: bytes, fn=inspect_image) -> str:
    with pytest.raises(ImageProblem) as caught:
        fn(data) if fn is inspect_image else fn("x", data)
    assert str(caught.value) == caught.value.reason
    return caught.value.reason


def animated_gif() -> bytes:
    frames = [PILImage.new("RGB", (120, 80), colour) for colour in (GREEN, RED, BLUE)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


# -- inspect_image ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, mime, mode", [("PNG", "image/png", "RGBA"), ("JPEG", "image/jpeg", "RGB"),
                                             ("WEBP", "image/webp", "RGB"), ("GIF", "image/gif", "P"),
                                             ("PNG", "image/png", "P"), ("JPEG", "image/jpeg", "L")])
def test_inspect_image_gives_the_mime_and_size(fmt: str, mime: str, mode: str) -> None:
    assert inspect_image(encoded(picture(321, 123, mode), fmt)) == (mime, 321, 123)


def test_inspect_image_of_an_animation_and_a_rotated_jpeg() -> None:
    assert inspect_image(animated_gif()) == ("image/gif", 120, 80)
    exif = PILImage.Exif()
    exif[0x0112] = 6
    assert inspect_image(encoded(picture(400, 300), "JPEG", exif=exif.tobytes())) == ("image/jpeg", 400, 300)


NOT_SENT = "it is not an image in a format that is sent (PNG, JPEG, WebP or GIF)"


@pytest.mark.parametrize("data, expected", [
    (b"this is plain text, not an image", NOT_SENT),
    (b"", NOT_SENT),
    (encoded(picture(20, 20), "BMP"), NOT_SENT),
    (encoded(picture(20, 20), "TIFF"), NOT_SENT),
    (encoded(picture(200, 200), "PNG")[:-200], "the image is damaged or incomplete and cannot be read"),
    (encoded(picture(200, 200), "JPEG")[:300], "the image is damaged or incomplete and cannot be read"),
    (png_declaring(8000, 8000), "it is too large: 8,000 × 8,000 pixels (at most 50 megapixels)"),
    (png_declaring(20000, 20000), "it is too large (more than 50 megapixels)"),  # Pillow's own bomb error
    (png_declaring(0, 10), "the image is damaged or incomplete and cannot be read"),
], ids=["text", "empty", "bmp", "tiff", "truncated-png", "truncated-jpeg", "64mp", "400mp", "no-pixels"])
def test_images_that_are_refused_say_why(data: bytes, expected: str) -> None:
    assert reason(data) == expected
    assert reason(data, for_model) == expected


def test_a_bomb_in_pillows_warning_zone_is_refused_even_when_warnings_are_errors() -> None:
    data = png_declaring(10_000, 10_000)  # 100 MP: Pillow warns (past ~89 MP) before our check refuses
    with pytest.warns(PILImage.DecompressionBombWarning):
        assert reason(data) == "it is too large: 10,000 × 10,000 pixels (at most 50 megapixels)"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PILImage.DecompressionBombWarning)
        assert reason(data) == "it is too large (more than 50 megapixels)"


def test_a_png_with_a_bad_checksum_is_caught_by_verify() -> None:
    data = bytearray(encoded(picture(50, 50), "PNG"))
    idat = data.find(b"IDAT")
    data[idat + 10] ^= 0xFF  # one byte of the compressed pixels: the chunk's CRC no longer matches
    assert reason(bytes(data)) == "the image is damaged or incomplete and cannot be read"


# -- for_model -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, expected", [
    ((4000, 3000), (1024, 768)),  # a 12 MP photo: fit 2048, then the short side 768
    ((3000, 4000), (768, 1024)),
    ((1000, 5000), (410, 2048)),  # tall: the long side decides, the short one is already small
    ((8000, 2000), (2048, 512)),  # wide
    ((2048, 2048), (768, 768)),
    ((1000, 1000), (768, 768)),
    ((800, 600), (800, 600)),  # short side under 768: as it is
    ((300, 200), (300, 200)),  # small: never scaled up
    ((1, 3000), (1, 2048)),
])
def test_for_model_scales_down_to_the_openai_limit(size: tuple[int, int], expected: tuple[int, int]) -> None:
    image = for_model("photo.png", encoded(picture(*size), "PNG"))
    assert (image.width, image.height) == expected == decoded(image).size
    assert (image.mime, image.name) == ("image/png", "photo.png")


def test_for_model_with_another_limit() -> None:
    image = for_model("p.jpg", encoded(picture(3000, 1500), "JPEG"), max_long=1568, max_short=1568)
    assert (image.width, image.height) == (1568, 784)


def test_an_image_that_fits_is_sent_as_it_is() -> None:
    data = encoded(picture(640, 480), "JPEG", quality=70)
    image = for_model("small.jpg", data)
    assert (image.data, image.mime, image.width, image.height) == (data, "image/jpeg", 640, 480)


@pytest.mark.parametrize("fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_a_scaled_image_keeps_its_format_and_its_picture(fmt: str, mime: str) -> None:
    image = for_model("p", encoded(picture(3000, 1000), fmt))
    result = decoded(image)
    assert (image.mime, result.format, result.size) == (mime, fmt, (2048, 683))
    assert near(result.convert("RGB").getpixel((1000, 100)), RED)
    assert near(result.convert("RGB").getpixel((1000, 600)), BLUE)


def test_exif_orientation_is_applied() -> None:
    exif = PILImage.Exif()
    exif[0x0112] = 6  # stored on its side: shown turned 90 degrees clockwise
    data = encoded(picture(400, 300), "JPEG", exif=exif.tobytes())
    image = for_model("phone.jpg", data)
    result = decoded(image).convert("RGB")
    assert (image.width, image.height, image.mime) == (300, 400, "image/jpeg")
    # the top (red) half is now on the right, the bottom (blue) on the left
    assert near(result.getpixel((260, 200)), RED) and near(result.getpixel((40, 200)), BLUE)
    assert result.getexif().get(0x0112, 1) == 1  # (no orientation left to apply twice)


def test_exif_orientation_with_scaling_of_a_big_jpeg() -> None:
    exif = PILImage.Exif()
    exif[0x0112] = 8  # shown turned 90 degrees counter-clockwise
    image = for_model("big.jpg", encoded(picture(4000, 3000), "JPEG", exif=exif.tobytes()))
    result = decoded(image).convert("RGB")
    assert (image.width, image.height) == (768, 1024) == result.size
    assert near(result.getpixel((100, 500)), RED) and near(result.getpixel((660, 500)), BLUE)


def test_an_animated_gif_becomes_its_first_frame_as_png() -> None:
    image = for_model("dance.gif", animated_gif())
    result = decoded(image)
    assert (image.mime, result.format, result.size) == ("image/png", "PNG", (120, 80))
    assert getattr(result, "n_frames", 1) == 1
    assert near(result.convert("RGB").getpixel((60, 40)), GREEN)


def test_a_still_gif_is_kept_when_it_fits_and_becomes_png_when_scaled() -> None:
    small = encoded(picture(100, 100), "GIF")
    assert for_model("s.gif", small).data == small
    big = for_model("b.gif", encoded(picture(2000, 1000), "GIF"))
    assert (big.mime, big.width, big.height) == ("image/png", 1536, 768)


def test_a_transparent_palette_png_keeps_its_transparency() -> None:
    image = PILImage.new("P", (2000, 1000), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (1000, 0, 2000, 1000))
    data = encoded(image, "PNG", transparency=0)
    result = decoded(for_model("t.png", data)).convert("RGBA")
    assert result.size == (1536, 768)
    assert result.getpixel((100, 100))[3] == 0 and result.getpixel((1400, 100)) == (0, 0, 255, 255)


def test_a_cmyk_jpeg_is_sent_as_rgb() -> None:
    image = for_model("print.jpg", encoded(picture(3000, 1000).convert("CMYK"), "JPEG"))
    result = decoded(image)
    assert (image.mime, result.mode, result.size) == ("image/jpeg", "RGB", (2048, 683))


def test_for_model_is_what_the_provider_message_carries() -> None:
    image = for_model("a.png", encoded(picture(10, 10), "PNG"))
    assert isinstance(image, Image) and image.data_url().startswith("data:image/png;base64,iVBOR")


# -- image_tokens ----------------------------------------------------------------------------------
def test_image_tokens_of_openais_worked_examples() -> None:
    # The vision guide's examples (detail "high"): 1024 x 1024 -> 765; 2048 x 4096 -> 1105.
    assert image_tokens("gpt-4o", 1024, 1024) == (765, True)
    assert image_tokens("gpt-4o", 2048, 4096) == (1105, True)
    # Patch models: 1024 x 1024 is 1024 patches; 1800 x 2400 is scaled to 1056 x 1408, 1452 patches.
    assert images.patch_tokens(1024, 1024, 1.0) == 1024
    assert images.patch_tokens(1800, 2400, 1.0) == 1452


@pytest.mark.parametrize("model, size, expected", [
    ("gpt-4o-2024-08-06", (1024, 1024), (765, True)),
    ("gpt-4.1", (512, 512), (255, True)),  # one tile: never scaled up
    ("gpt-4o-mini", (1024, 1024), (2833 + 4 * 5667, True)),
    ("gpt-4o-mini-2024-07-18", (512, 512), (2833 + 5667, True)),
    ("gpt-5", (1024, 1024), (70 + 4 * 140, True)),
    ("o3", (1024, 1024), (75 + 4 * 150, True)),
    ("gpt-4.1-mini", (1024, 1024), (1659, True)),  # 1024 patches x 1.62, rounded up
    ("o4-mini", (64, 64), (7, True)),  # 4 patches x 1.72
    ("openai/gpt-4o", (1024, 1024), (765, True)),
    ("llama3.1:8b", (1024, 1024), (765, False)),  # unknown: the gpt-4o rule, as an estimate
    ("gpt-4o", (4000, 3000), (765, True)),  # scaled like for_model: 1024 x 768, 2 x 2 tiles
    ("gpt-4o", (1000, 5000), (85 + 170 * 4, True)),  # 410 x 2048: 1 x 4 tiles
])
def test_image_tokens_by_model(model: str, size: tuple[int, int], expected: tuple[int, bool]) -> None:
    assert image_tokens(model, *size) == expected


def test_the_limit_is_openais_high_detail() -> None:
    assert OPENAI_LIMIT == (2048, 768)
    assert images.fit_size(4096, 2048, *OPENAI_LIMIT) == (1536, 768)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [(300, 200), (3000, 2000)], ids=["as-is", "scaled"])
def test_every_exif_orientation_matches_pillows_own(orientation: int, size: tuple[int, int]) -> None:
    from PIL import ImageOps

    quadrants = PILImage.new("RGB", size, RED)
    w, h = size
    quadrants.paste(BLUE, (w // 2, 0, w, h // 2))
    quadrants.paste(GREEN, (0, h // 2, w // 2, h))
    quadrants.paste((255, 255, 255), (w // 2, h // 2, w, h))
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    data = encoded(quadrants, "JPEG", exif=exif.tobytes())
    expected = ImageOps.exif_transpose(PILImage.open(io.BytesIO(data))).convert("RGB")
    result = decoded(for_model("q.jpg", data)).convert("RGB")
    assert result.size == images.fit_size(*expected.size, *OPENAI_LIMIT)
    for fx, fy in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]:
        got = result.getpixel((int(fx * result.width), int(fy * result.height)))
        want = expected.getpixel((int(fx * expected.width), int(fy * expected.height)))
        assert near(got, want), (fx, fy, got, want)


def test_a_photo_goes_to_the_model_without_its_gps_position() -> None:
    """Even when no scaling is needed: the EXIF (here a GPS block) stays with the user."""
    from PIL import Image as PILImage

    exif = PILImage.Exif()
    exif[0x8825] = {2: (48.0, 51.0, 29.0), 1: "N"}  # GPSInfo: latitude
    exif[0x010F] = "CameraMaker"
    buffer = io.BytesIO()
    PILImage.new("RGB", (200, 100), "white").save(buffer, "JPEG", exif=exif)
    original = buffer.getvalue()
    assert PILImage.open(io.BytesIO(original)).getexif().get(0x010F) == "CameraMaker"
    sent = for_model("photo.jpg", original)
    assert sent.data != original and (sent.width, sent.height) == (200, 100)
    reopened = PILImage.open(io.BytesIO(sent.data))
    assert not reopened.getexif() and "exif" not in reopened.info
