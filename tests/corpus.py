"""A hostile web-crawl corpus, built at test time: shards holding one sample of every class of bad
input the fit job must survive, between good ones, with what the job must do with each.

`EXPECT_FAILED[key]` is the reason a sample must be recorded with; `EXPECT_NOTED[key]` the note
of a sample that must still be fitted. Keys in neither are good samples that must be fitted.
Limits the corpus is built for: `LIMITS` (the test passes them to the job).
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from splatclip import datasets

LIMITS = ["limits.max_member_bytes=1048576", "limits.max_shard_bytes=4194304"]


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


_PHOTOS: list = []


def photo(i: int) -> bytes:
    """A small real photo (scikit-image's), as JPEG."""
    if not _PHOTOS:
        _PHOTOS.extend(datasets.photos())
    sample = _PHOTOS[i % len(_PHOTOS)]
    data = sample.get("jpg") or sample["png"]
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img.thumbnail((96, 96))
    return encoded(img, "JPEG")


def member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def header_only(name: str, declared: int) -> bytes:
    """A plain header declaring `declared` bytes, without the data (for a tail cut inside it)."""
    info = tarfile.TarInfo(name)
    info.size = declared
    return info.tobuf(tarfile.GNU_FORMAT)


def sparse_header(name: str, stored: bytes, realsize: int) -> bytes:
    """An old-GNU sparse member: `stored` bytes in the archive that expand to `realsize` when read."""
    info = tarfile.TarInfo(name)
    info.size = len(stored)
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    buf[156:157] = tarfile.GNUTYPE_SPARSE
    buf[386:398] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)  # one region: offset 0 ...
    buf[398:410] = tarfile.itn(len(stored), 12, tarfile.GNU_FORMAT)  # ... of the stored bytes
    buf[483:495] = tarfile.itn(realsize, 12, tarfile.GNU_FORMAT)
    buf[148:156] = b" " * 8
    checksum = sum(buf[:512])
    buf[148:156] = b"%06o\0 " % checksum
    pad = (-len(stored)) % 512
    return bytes(buf) + stored + b"\0" * pad


def tar_bytes(items: list) -> bytes:
    """A tar of members ((TarInfo, data) pairs) and raw blocks (bytes, spliced in as they are)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for item in items:
            if isinstance(item, bytes):
                tar.fileobj.write(item)
                tar.offset += len(item)
            else:
                info, data = item
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def damage_header(data: bytes, name: str) -> bytes:
    """The archive with the header of member `name` overwritten (its checksum no longer matches)."""
    at = data.index(name.encode())
    at -= at % 512
    return data[:at] + b"\x7f" * 512 + data[at + 512 :]


# (key, reason) of every sample the fit job must record as failed, in shard order; key "" stands for
# bytes that no sample can be named for (a destroyed header, the part of a shard past its limit)
EXPECT_FAILED = [
    ("thin", "aspect_ratio"),
    ("gif", "undecodable"),
    ("bomb", "too_large"),
    ("empty", "empty"),
    ("truncimg", "truncated"),
    ("bigmember", "member_too_large"),
    ("sparse", "member_too_large"),
    ("../escape", "unsafe_path"),
    ("ctrl\x01key", "unsafe_path"),
    ("captiononly", "no_image"),
    ("", "damaged_archive"),  # the destroyed header of damaged.jpg (found while good0's second sample is open)
    ("good0", "duplicate_key"),  # the second sample keyed good0; the first is fitted
    ("damaged", "no_image"),  # its caption survives
    ("tail", "truncated"),  # shard 00001's gzip stream ends inside tail.jpg
    ("zeros", "no_image"),  # shard 00002: a sample with no image ...
    ("", "shard_too_large"),  # ... whose 8 MiB of zeros unpack past max_shard_bytes
]
EXPECT_NOTED = {
    "deepjson": "bad_metadata",
    "nanjson": "bad_metadata",
    "reserved": "reserved_name",
    "dupmember": "duplicate_member",
    "badutf8": "bad_text",
    "badcls": "bad_class",
}
GOOD = ["good0", "deepjson", "nanjson", "reserved", "dupmember", "badutf8", "badcls", "good1", "gz0", "gz1",
        "gzbomb0"]


def sample(key: str, image: bytes | None, **members: bytes) -> list:
    items = [member(f"{key}.jpg", image)] if image is not None else []
    items += [member(f"{key}.{ext}", data) for ext, data in members.items()]
    return items


def hostile_shards(directory: Path) -> dict[str, str]:
    """Write the corpus; returns {file name: what it is}. Shard 00000 holds a sample of every
    member-level class, 00001 is gzip-compressed and cut short, 00002 is a gzip bomb, 00003 is not
    a tar at all, 00004 is an empty tar."""
    directory.mkdir(parents=True, exist_ok=True)
    thin = encoded(Image.new("RGB", (40000, 1), (200, 30, 30)), "PNG")  # ~200 bytes
    gif = encoded(Image.new("RGB", (32, 32), (0, 90, 0)), "GIF")
    bomb = encoded(Image.new("L", (12000, 12000)), "PNG")  # 144 Mpx of zeros in a few KB
    jpeg = photo(1)
    items = [
        *sample("good0", photo(0), txt=b"a photo", json=b'{"url": "http://example.invalid/0"}', cls=b"3"),
        *sample("thin", thin, txt=b"a line"),
        *sample("deepjson", photo(2), txt=b"deep", json=b"[" * 100_000 + b"]" * 100_000),
        *sample("nanjson", photo(3), txt=b"nan", json=b'{"width": NaN}'),
        *sample("reserved", photo(4), txt=b"reserved", __error__=b"\xff\xfe\x00binary"),
        *sample("dupmember", photo(5), txt=b"first caption"), member("dupmember.txt", b"second caption"),
        *sample("badutf8", photo(6), txt=b"caf\xe9 \xff\xfe"),
        *sample("badcls", photo(7), txt=b"class", cls=b"not-a-number"),
        *sample("gif", gif, txt=b"a gif called jpg"),
        *sample("bomb", bomb, txt=b"bomb"),
        *sample("empty", b"", txt=b"empty"),
        *sample("truncimg", jpeg[: len(jpeg) // 3], txt=b"cut"),
        *sample("bigmember", np.random.default_rng(0).bytes(1_500_000), txt=b"big"),
        sparse_header("sparse.jpg", b"x" * 512, 50 << 30), member("sparse.txt", b"sparse"),
        *sample("../escape", jpeg, txt=b"escape"),
        *sample("ctrl\x01key", jpeg, txt=b"control"),
        member("captiononly.txt", b"a caption without its image"),
        *sample("good0", photo(1), txt=b"the same key again"),
        *sample("damaged", photo(2), txt=b"damaged"),
        *sample("good1", photo(3), txt=b"last", json=b"{}"),
    ]
    data = damage_header(tar_bytes(items), "damaged.jpg")
    (directory / "hostile-00000.tar").write_bytes(data)

    good = tar_bytes([*sample("gz0", photo(4), txt=b"zipped"), *sample("gz1", photo(5), txt=b"zipped"),
                      *sample("tail", photo(6), txt=b"cut off")])
    packed = gzip.compress(good)
    cut = gzip.compress(good[: good.index(b"tail.jpg") + 2048])  # the stream ends inside tail.jpg
    (directory / "hostile-00001.tar.gz").write_bytes(cut[:-8] if len(cut) > 8 else packed)

    zeros = tar_bytes([*sample("gzbomb0", photo(7), txt=b"before the bomb"),
                       member("zeros.bin", b"\0" * (8 << 20))])
    (directory / "hostile-00002.tar.gz").write_bytes(gzip.compress(zeros))
    (directory / "hostile-00003.tar").write_bytes(b"\x00not a tar archive\xff" * 200)
    (directory / "hostile-00004.tar").write_bytes(tar_bytes([]))
    return {"hostile-00000.tar": "every member-level class", "hostile-00001.tar.gz": "gzip, cut short",
            "hostile-00002.tar.gz": "gzip bomb", "hostile-00003.tar": "not a tar", "hostile-00004.tar": "empty"}
