#!/usr/bin/env python3
"""Re-create data/pride-and-prejudice.txt from Debian's r-cran-janeaustenr package.

The committed text was made with this script; it is kept so the provenance can be
checked. Usage (needs no R):

    apt-get download r-cran-janeaustenr          # 1.0.0-1
    dpkg-deb -x r-cran-janeaustenr_1.0.0-1_all.deb ja
    python3 scripts/extract-pride-and-prejudice.py ja > data/pride-and-prejudice.txt

The package keeps each novel as an R character vector (one element per line) in the
lazy-load database data/Rdata.rdb, indexed by data/Rdata.rdx (a gzip'd R
serialisation). Each entry is a 4-byte big-endian length followed by a zlib stream
holding an XDR R serialisation; a character vector is a STRSXP of CHARSXPs.
"""
import gzip
import struct
import sys
import zlib

base = sys.argv[1].rstrip("/") + "/usr/lib/R/site-library/janeaustenr/data/"


def be32(buf, p):
    return struct.unpack(">i", buf[p:p + 4])[0], p + 4


def skip_header(u):
    assert u[:2] == b"X\n", "not an XDR R serialisation"
    p = 2
    version, p = be32(u, p)
    p += 8  # writer R version, minimal reader version
    if version == 3:
        n, p = be32(u, p)
        p += n  # native encoding name
    return p


# Index: find the (offset, length) of "prideprejudice" in the rdx's `variables` list.
rdx = gzip.decompress(open(base + "Rdata.rdx", "rb").read())
names = [b"emma", b"mansfieldpark", b"northangerabbey", b"persuasion",
         b"prideprejudice", b"sensesensibility"]
# The variables list holds six INTSXP of length 2 (flags 0x0d, length 2) in name order.
pos = skip_header(rdx)
pairs = []
p = pos
while len(pairs) < 6:
    i = rdx.index(b"\x00\x00\x00\x0d\x00\x00\x00\x02", p)
    off, ln = struct.unpack(">ii", rdx[i + 8:i + 16])
    pairs.append((off, ln))
    p = i + 16
for n in names:
    assert n in rdx, n
off, ln = pairs[names.index(b"prideprejudice")]

rdb = open(base + "Rdata.rdb", "rb").read()
blk = rdb[off:off + ln]
(want,) = struct.unpack(">I", blk[:4])
u = zlib.decompress(blk[4:])
assert len(u) == want
p = skip_header(u)
flags, p = be32(u, p)
assert flags & 0xFF == 16, "expected a character vector"
count, p = be32(u, p)
lines = []
for _ in range(count):
    f, p = be32(u, p)
    assert f & 0xFF == 9
    n, p = be32(u, p)
    assert n >= 0
    lines.append(u[p:p + n].decode("utf-8"))
    p += n
assert p == len(u)
sys.stdout.write("\n".join(lines) + "\n")
