"""A JPEG stream's marker chain, checked before DALI's decoder sees it (where the shards were not
verified), and the one line that names an image that cannot be decoded."""
from __future__ import annotations

from alexnet_base.errors import UserError


def damaged_image(file: str, key: str, reason: str) -> UserError:
    """What the loader says of an image it cannot decode: the file, the key, and the repair."""
    return UserError(f"{file}: image {key} cannot be decoded ({reason}); the shard is damaged: "
                     f"`alexnet-pipe verify` lists every damaged file, and the same prepare "
                     f"command rewrites them; the last checkpoint is intact (--resume)")


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (not DHT, JPG, DAC)


def header_problem(stream) -> str | None:
    """Why the markers of a JPEG stream (bytes-like) do not parse up to its scan data, or None.

    The chain of ISO/IEC 10918-1 (Annex B): start of image, then marker segments (0xFF, fill
    0xFFs, a code; a big-endian length that counts itself, except for standalone codes), a frame
    header, and the start of scan, the last two holding the 1-4 components they count. Tables
    and the scan's entropy-coded bytes are not looked at: libjpeg's errors there reach DALI's
    decoder and come back as its ordinary error.

    The reader checks this where the shards were not verified: DALI 2.4's decoder crashes the
    process (a use after free in its thread pool) when its JPEG parser rejects a stream while
    other streams of the batch are still queued, so such a stream must never reach it
    (tools/fuzz_jpeg_check.py looks for streams that pass and still crash it)."""
    data = memoryview(stream).cast("B")
    n, pos, frame = len(data), 2, False
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return "no JPEG start-of-image marker"
    while True:
        if pos >= n or data[pos] != 0xFF:
            return f"invalid marker at byte {pos}" if pos < n else "it ends inside its headers"
        while pos < n and data[pos] == 0xFF:  # fill bytes before the code
            pos += 1
        if pos >= n:
            return "it ends inside its headers"
        code, pos = data[pos], pos + 1
        if code == 0x01 or 0xD0 <= code <= 0xD7:  # standalone: TEM, RSTn
            continue
        if code in (0x00, 0xD8, 0xD9):
            return f"invalid marker at byte {pos - 2}"
        if pos + 2 > n:
            return "it ends inside its headers"
        length = data[pos] << 8 | data[pos + 1]
        if length < 2:  # it counts its own two bytes
            return f"the segment at byte {pos - 2} has length {length}"
        if pos + length > n:
            return f"the segment at byte {pos - 2} runs past the end of the stream"
        if code in _SOF or code == 0xDA:  # what the parser reads inside: the components
            # (frame: precision, height, width, count, 3 bytes each; scan: count, 2 bytes each,
            # then 3 bytes of spectral selection and approximation)
            count_at, size, fixed = (pos + 7, 3, 8) if code in _SOF else (pos + 2, 2, 6)
            count = data[count_at] if count_at < n else 0
            if not 1 <= count <= 4 or length != fixed + size * count:
                return (f"the {'frame' if code in _SOF else 'scan'} header at byte {pos - 2} "
                        f"does not hold its {count} components")
        if code == 0xDA:
            return None if frame else "no frame header before the scan"
        frame |= code in _SOF
        pos += length
