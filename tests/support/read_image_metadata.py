"""Reads images back with Pillow, independently of the Rust writer (tests/output_formats.rs).

Usage: read_image_metadata.py FILE [QUALITY] ...  (pairs; QUALITY "-" for none)
Prints one JSON object per file: format, size, the A1111 parameters as AUTOMATIC1111 reads them
(PNG text chunk `parameters`; JPEG/WebP EXIF UserComment decoded as piexif does: `UNICODE\\0` +
UTF-16BE), the `sdbatch` record, the XMP packet, and for JPEG the quantization tables of the file
and of Pillow's own encoding of the same pixels at QUALITY (equal tables: the quality was honoured).
"""
import io
import json
import sys

from PIL import Image

USER_COMMENT = 0x9286
EXIF_IFD = 0x8769


def user_comment(img):
    exif = img.getexif()
    raw = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
    if raw is None:
        return None
    if raw[:8] == b"UNICODE\0":
        return raw[8:].decode("utf_16_be")
    raise SystemExit(f"unexpected UserComment prefix {raw[:8]!r}")


def read(path, quality):
    img = Image.open(path)
    img.load()
    out = {"format": img.format, "size": list(img.size), "mode": img.mode}
    if img.format == "PNG":
        out["parameters"] = img.info.get("parameters")
        out["record"] = img.info.get("sdbatch")
    else:
        out["parameters"] = user_comment(img)
    xmp = img.info.get("xmp")
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8")
    out["xmp"] = xmp
    if img.format == "JPEG":
        out["quantization"] = {str(k): list(v) for k, v in img.quantization.items()}
        if quality is not None:
            buf = io.BytesIO()
            img.convert("RGB").save(buf, "JPEG", quality=quality)
            ref = Image.open(io.BytesIO(buf.getvalue()))
            out["pillow_quantization"] = {str(k): list(v) for k, v in ref.quantization.items()}
    return out


def main():
    args = sys.argv[1:]
    for path, q in zip(args[::2], args[1::2]):
        print(json.dumps(read(path, None if q == "-" else int(q))))


main()
