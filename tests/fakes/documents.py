"""Documents made in the tests (no binary fixtures): PDFs with text on each page, and encrypted ones."""

from __future__ import annotations

import io

from fpdf import FPDF
from pypdf import PdfWriter


def pdf_pages(texts: list[str]) -> bytes:
    """A PDF with one page per text."""
    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    for text in texts:
        pdf.add_page()
        pdf.multi_cell(0, 5, text)
    return bytes(pdf.output())


def encrypted(data: bytes, user: str = "secret", owner: str = "owner") -> bytes:
    """``data`` (a PDF) encrypted with RC4-128; ``user`` "" opens without a password."""
    writer = PdfWriter(clone_from=io.BytesIO(data))
    writer.encrypt(user_password=user, owner_password=owner, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
