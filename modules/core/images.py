"""Images attached to a message: checked, scaled down for the model, and counted.

:func:`inspect_image` checks an attached file is an image the app sends (PNG, JPEG, WebP or GIF)
that decodes whole and is not a decompression bomb. :func:`for_model` makes the copy that is sent:
scaled down (never up) to the provider's limit, EXIF orientation applied, in its own format where
providers take it. :func:`image_tokens` is what an image costs in the prompt. All of it is
synchronous and takes milliseconds to a few hundred (a big photo): callers run it off the event
loop. A file that is refused raises :class:`ImageProblem` with one short English reason.
"""

from __future__ import annotations

import io
import math
from typing import Iterable

from PIL import Image as PILImage

from modules.providers import Image

MAX_PIXELS = 50_000_000  # larger images are refused before they are decoded
# OpenAI's "high" detail limit: fit within 2048 x 2048, then the shortest side at most 768
# (https://platform.openai.com/docs/guides/images-vision#calculating-costs). A larger image
# is scaled so by OpenAI anyway: sending it larger only costs upload time.
OPENAI_LIMIT = (2048, 768)
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_SAVE = {"PNG": {"compress_level": 3}, "JPEG": {"quality": 90, "optimize": False}, "WEBP": {"quality": 90}}
ACCEPTED = "PNG, JPEG, WebP or GIF"
DAMAGED = "the image is damaged or incomplete and cannot be read"
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_T = PILImage.Transpose
_TRANSPOSE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE,
              6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}  # as ImageOps.exif_transpose


class ImageProblem(ValueError):
    """An image that is refused; ``reason`` is one short English sentence without the file's name."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _opened(data: bytes) -> PILImage.Image:
    """The image opened (its header read, nothing decoded), checked for format and size."""
    try:
        # Pillow raises DecompressionBombError past twice its own limit (~179 MP) and warns past it
        # (~89 MP; that warning is left alone, not filtered: filters are process-wide and not thread-
        # safe to change). Ours is lower, checked below, and refuses both before anything is decoded.
        image = PILImage.open(io.BytesIO(data), formats=list(MIME))
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise ImageProblem(f"it is too large (more than {MAX_PIXELS // 1_000_000} megapixels)") from None
    except PILImage.UnidentifiedImageError:
        if _looks_sent(data):  # the magic bytes of one, yet Pillow cannot make sense of its header
            raise ImageProblem(DAMAGED) from None
        raise ImageProblem(f"it is not an image in a format that is sent ({ACCEPTED})") from None
    except Exception:  # a header Pillow recognises but cannot parse
        raise ImageProblem(DAMAGED) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageProblem(DAMAGED)  # (no pixels)
    if width * height > MAX_PIXELS:
        raise ImageProblem(f"it is too large: {width:,} × {height:,} pixels "
                           f"(at most {MAX_PIXELS // 1_000_000} megapixels)")
    return image


def _looks_sent(data: bytes) -> bool:
    return data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")) \
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _decoded(image: PILImage.Image) -> None:
    try:
        image.load()
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise ImageProblem(f"it is too large (more than {MAX_PIXELS // 1_000_000} megapixels)") from None
    except Exception:  # truncated data, bad chunks, a broken decoder stream
        raise ImageProblem(DAMAGED) from None


def inspect_image(data: bytes) -> tuple[str, int, int]:
    """(mime, width, height) of an image that is sent: PNG, JPEG, WebP or GIF that decodes whole
    and has at most :data:`MAX_PIXELS`; else :class:`ImageProblem`. The size is as stored (before
    any EXIF rotation)."""
    image = _opened(data)
    try:
        image.verify()  # checksums and structure, on this copy (verify leaves it unusable)
    except Exception:
        raise ImageProblem(DAMAGED) from None
    image = _opened(data)
    with image:
        _decoded(image)
        return MIME[image.format], image.width, image.height


def fit_size(width: int, height: int, max_long: int, max_short: int) -> tuple[int, int]:
    """``width`` x ``height`` scaled down (never up), aspect kept, to fit within ``max_long`` x
    ``max_long`` and then to a shortest side of at most ``max_short``."""
    scale = min(1.0, max_long / max(width, height))
    if min(width, height) * scale > max_short:
        scale = max_short / min(width, height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def for_model(name: str, data: bytes, *, max_long: int = OPENAI_LIMIT[0],
              max_short: int = OPENAI_LIMIT[1]) -> Image:
    """The copy of an image that is sent to a model: scaled down (never up) to fit ``max_long`` x
    ``max_long`` with a shortest side of at most ``max_short``, EXIF orientation applied, in its
    own format (PNG, JPEG, WebP, a still GIF) or, for an animation, its first frame as PNG, and
    without its metadata (EXIF, XMP: where and with what it was taken). An image that needs none
    of that is sent as it is (the same bytes). ``data`` is never changed."""
    image = _opened(data)
    with image:
        fmt = image.format
        orientation = _orientation(image)
        turned = orientation in _ROTATED
        width, height = (image.height, image.width) if turned else image.size
        target = fit_size(width, height, max_long, max_short)
        animated = bool(getattr(image, "is_animated", False))  # (looks for a second frame only)
        # Metadata (EXIF: a camera's serial, the GPS position) is the user's, not the model's.
        private = bool(image.info.get("exif")) or bool(image.getexif()) or "xmp" in image.info
        if target == (width, height) and orientation == 1 and not animated and not private:
            _decoded(image)  # (checks it decodes whole)
            return Image(MIME[fmt], data, width, height, name)
        stored = (target[1], target[0]) if turned else target  # the target before the rotation
        if fmt == "JPEG":  # decode at 1/2, 1/4 or 1/8 of the size straight away when that is enough
            image.draft(None, stored)
        _decoded(image)
        frame = _plain_mode(image if not animated else _first_frame(image), fmt)
        if frame.size != stored:  # scaled first, then turned: turning the smaller image is quicker
            frame = frame.resize(stored, PILImage.Resampling.LANCZOS, reducing_gap=1.5)
        if orientation != 1:
            frame = frame.transpose(_TRANSPOSE[orientation])
        out_fmt = "PNG" if animated or fmt == "GIF" else fmt
        buffer = io.BytesIO()
        frame.save(buffer, out_fmt, **_SAVE[out_fmt])  # (no EXIF is written: nothing left to apply)
        return Image(MIME[out_fmt], buffer.getvalue(), frame.width, frame.height, name)


def _orientation(image: PILImage.Image) -> int:
    """The EXIF orientation, 1 (as stored) to 8. (A PNG's EXIF can follow its pixels: reading it
    decodes the image.)"""
    if image.format not in ("JPEG", "PNG", "WEBP"):
        return 1
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:
        raise ImageProblem(DAMAGED) from None
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _first_frame(image: PILImage.Image) -> PILImage.Image:
    image.seek(0)
    return image.convert("RGBA")


def _plain_mode(image: PILImage.Image, fmt: str) -> PILImage.Image:
    """A mode that resizes well (Pillow resizes palettes and 1-bit images by nearest neighbour) and
    that ``fmt`` (PNG, for a GIF) saves: palettes become RGB(A), CMYK and the like RGB."""
    mode = image.mode
    if mode in ("RGB", "RGBA", "L", "LA", "I;16", "I;16B", "I;16L"):
        return image
    if mode in ("P", "PA"):
        alpha = mode == "PA" or "transparency" in image.info
        return image.convert("RGBA" if alpha and fmt != "JPEG" else "RGB")
    if mode in ("1", "I", "F"):
        return image.convert("L")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV


# -- what an image costs in the prompt -------------------------------------------------------------
# OpenAI's published rules, from the vision guide's "Calculating costs" section
# (https://platform.openai.com/docs/guides/images-vision#calculating-costs), for detail "high"
# (what "auto" picks for images this large). Tile models: the image is scaled to fit
# 2048 x 2048, then its shortest side to 768 (never up); it costs a base plus a price per
# 512 px tile. Patch models: 32 px patches, at most 1536 (scaled down to fit), times a
# multiplier. Keys are model id prefixes ("gpt-4o" also names gpt-4o-2024-08-06).
TILE_RULES: dict[str, tuple[int, int]] = {
    "gpt-4o": (85, 170), "gpt-4.1": (85, 170), "gpt-4.5": (85, 170), "chatgpt-4o": (85, 170),
    "gpt-4-turbo": (85, 170), "gpt-4-vision": (85, 170),
    "gpt-4o-mini": (2833, 5667),
    "gpt-5": (70, 140), "gpt-5-chat": (70, 140),
    "o1": (75, 150), "o1-pro": (75, 150), "o3": (75, 150),
    "computer-use-preview": (65, 129),
}
PATCH_RULES: dict[str, float] = {
    "gpt-4.1-mini": 1.62, "gpt-4.1-nano": 2.46, "o4-mini": 1.72, "gpt-5-mini": 1.62, "gpt-5-nano": 2.46,
}
ESTIMATE_RULE = TILE_RULES["gpt-4o"]  # for every other model: an estimate
MAX_PATCHES = 1536


def _rule_for(model_id: str) -> tuple[int, int] | float | None:
    """The rule for ``model_id``: the longest key that is the id or a prefix of it before a "-"."""
    model = model_id.lower().rsplit("/", 1)[-1]  # "openai/gpt-4o" as some gateways name it
    best: tuple[int, int] | float | None = None
    best_len = -1
    for key, rule in [*TILE_RULES.items(), *PATCH_RULES.items()]:
        if (model == key or model.startswith(key + "-")) and len(key) > best_len:
            best, best_len = rule, len(key)
    return best


def tile_tokens(width: int, height: int, base: int, per_tile: int) -> int:
    w, h = fit_size(width, height, *OPENAI_LIMIT)
    return base + per_tile * math.ceil(w / 512) * math.ceil(h / 512)


def patch_tokens(width: int, height: int, multiplier: float) -> int:
    patches = math.ceil(width / 32) * math.ceil(height / 32)
    if patches > MAX_PATCHES:
        r = math.sqrt(32 * 32 * MAX_PATCHES / (width * height))
        r *= min(math.floor(width * r / 32) / (width * r / 32), math.floor(height * r / 32) / (height * r / 32))
        # (the scaled sides are whole patches in one direction: no rounding error may add one)
        patches = min(MAX_PATCHES, math.ceil(width * r / 32 - 1e-9) * math.ceil(height * r / 32 - 1e-9))
    return math.ceil(patches * multiplier)


def image_tokens(model_id: str, width: int, height: int) -> tuple[int, bool]:
    """Prompt tokens of a ``width`` x ``height`` image for ``model_id``: (tokens, exact). Exact for
    models whose published rule is known (:data:`TILE_RULES`, :data:`PATCH_RULES`); else the
    gpt-4o rule, as an estimate."""
    rule = _rule_for(model_id)
    if isinstance(rule, tuple):
        return tile_tokens(width, height, *rule), True
    if isinstance(rule, float):
        return patch_tokens(width, height, rule), True
    return tile_tokens(width, height, *ESTIMATE_RULE), False


def images_tokens(model_id: str, images: Iterable[Image]) -> tuple[int, bool]:
    """The tokens of several images: (sum, all exact)."""
    total, exact = 0, True
    for image in images:
        n, known = image_tokens(model_id, image.width, image.height)
        total, exact = total + n, exact and known
    return total, exact
