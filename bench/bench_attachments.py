"""How long reading an attached document and preparing an attached image take (issue #13).

Makes its fixtures in memory (nothing is downloaded or written): a 100-page PDF with fpdf2
(about 3,000 characters a page), a DOCX with the same text (python-docx, a table every ten
"pages"), a 12-megapixel JPEG photo-like picture and a 4000 x 3000 PNG screenshot-like one.
Prints the median (p50) and the slowest of ``--runs`` runs of ``read_document`` (with
characters per second), ``inspect_image`` and ``for_model``.

    .venv/bin/python bench/bench_attachments.py [--pages 100] [--runs 5]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import docx  # noqa: E402
from fpdf import FPDF  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from modules.core.documents import read_document  # noqa: E402
from modules.core.images import for_model, inspect_image  # noqa: E402

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more can said who "
         "report quarterly revenue growth region market customer product service analysis figure table result "
         "increase decrease compared previous year percent total average estimate forecast summary").split()


def page_texts(pages: int, chars: int, seed: int = 13) -> list[str]:
    rnd = random.Random(seed)
    texts = []
    for _ in range(pages):
        paragraphs, length = [], 0
        while length < chars:
            sentence = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(8, 20))).capitalize() + "."
            paragraphs.append(sentence)
            length += len(sentence) + 1
        texts.append(" ".join(paragraphs)[:chars])
    return texts


def make_pdf(texts: list[str]) -> bytes:
    pdf = FPDF()
    pdf.set_auto_page_break(False)
    pdf.set_font("helvetica", size=8)
    for text in texts:
        pdf.add_page()
        pdf.multi_cell(0, 3.4, text)
    return bytes(pdf.output())


def make_docx(texts: list[str]) -> bytes:
    document = docx.Document()
    for number, text in enumerate(texts, 1):
        if number % 10 == 1:
            document.add_heading(f"Section {number // 10 + 1}", level=1)
        for start in range(0, len(text), 600):
            document.add_paragraph(text[start:start + 600])
        if number % 10 == 0:
            table = document.add_table(rows=6, cols=4)
            for r in range(6):
                for c in range(4):
                    table.cell(r, c).text = f"r{r}c{c} {WORDS[(r * 4 + c) % len(WORDS)]}"
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def photo(width: int, height: int) -> Image.Image:
    """Smooth gradients with grain: decodes like a photo (a JPEG of noise or of flat colour would not)."""
    gradient = Image.linear_gradient("L").resize((width, height))
    grain = Image.effect_noise((width, height), 40).filter(ImageFilter.GaussianBlur(1))
    blobs = Image.radial_gradient("L").resize((width, height))
    return Image.merge("RGB", (gradient, grain, blobs))


def screenshot(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    rnd = random.Random(5)
    for _ in range(60):
        x, y = rnd.randrange(width - 400), rnd.randrange(height - 200)
        draw.rectangle((x, y, x + rnd.randint(100, 400), y + rnd.randint(40, 200)),
                       fill=tuple(rnd.randrange(256) for _ in range(3)))
    for y in range(20, height, 18):
        draw.text((20, y), " ".join(rnd.choice(WORDS) for _ in range(40)), fill="black")
    return image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def timed(fn: Callable[[], object], runs: int) -> tuple[list[float], object]:
    result, times = None, []
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return times, result


def row(label: str, times: list[float], extra: str = "") -> None:
    print(f"{label:<44} p50 {statistics.median(times) * 1000:8.1f} ms   max {max(times) * 1000:8.1f} ms   {extra}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=100)
    parser.add_argument("--chars", type=int, default=3000, help="characters a page")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    limits = {"max_chars": 2_000_000, "max_pages": 2000}
    texts = page_texts(args.pages, args.chars)

    started = time.perf_counter()
    pdf = make_pdf(texts)
    print(f"fixtures: PDF {args.pages} pages, {len(pdf) / 1e6:.2f} MB (made in {time.perf_counter() - started:.1f} s)", end="")
    started = time.perf_counter()
    word = make_docx(texts)
    print(f"; DOCX {len(word) / 1e6:.2f} MB (made in {time.perf_counter() - started:.1f} s)")

    times, doc = timed(lambda: read_document("bench.pdf", pdf, **limits), args.runs)
    chars = len(doc.text)
    row(f"read_document PDF ({doc.pages} pages, {chars:,} chars)", times,
        f"{chars / statistics.median(times) / 1e6:.2f} M chars/s, "
        f"{doc.pages / statistics.median(times):.0f} pages/s")
    times, doc = timed(lambda: read_document("bench.docx", word, **limits), args.runs)
    row(f"read_document DOCX ({len(doc.text):,} chars)", times,
        f"{len(doc.text) / statistics.median(times) / 1e6:.2f} M chars/s")

    jpeg = encoded(photo(4000, 3000), "JPEG", quality=90)
    png = encoded(screenshot(4000, 3000), "PNG")
    for label, data in (("JPEG 4000x3000 (12 MP)", jpeg), ("PNG 4000x3000", png)):
        times, _ = timed(lambda: inspect_image(data), args.runs)
        row(f"inspect_image {label}, {len(data) / 1e6:.1f} MB", times)
        times, image = timed(lambda: for_model("bench", data), args.runs)
        row(f"for_model {label}", times, f"-> {image.width}x{image.height} {image.mime}, "
                                         f"{len(image.data) / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
