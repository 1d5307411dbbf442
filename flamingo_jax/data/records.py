"""TFRecord files read in Python, so that damage is counted and skipped, never fatal.

tf.data's TFRecordDataset stops with `DataLossError` at the first bad checksum
or cut-off record, and a training run dies with it. This reader parses the
framing itself, record by record (all integers little-endian):

  uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)
  masked(c) = ((c >> 15) | (c << 17)) + 0xA282EAD8   (mod 2^32)

and turns what can go wrong into damage items of the record stream:
  corrupt_record   the data checksum fails: that record is dropped and reading
                   goes on right after it (its length was intact); or the
                   header checksum fails: the length cannot be trusted, so the
                   reader scans forward to the next byte offset where a whole
                   record (header and data checksums) holds, and goes on there
  truncated_shard  the file ends inside a record (an interrupted copy): the rest of the file is dropped
  unreadable_file  the file cannot be opened or read (vanished, no permission, I/O error):
                   the rest of the file is dropped

CRC-32C (Castagnoli) has no fast implementation in the standard library, so
it is vectorised with numpy here (100-200 MB/s on one core). A CRC is linear
over GF(2): the checksum of a message is the XOR of each byte's contribution,
and a contribution only depends on the byte and on how many bytes follow it.
So: one table gather gives the checksums of all 32-byte blocks (a 32 x 256
table, a row per position in the block); a second gather moves each block's
checksum over the blocks after it in its 32 KiB piece (a table per distance,
split into the register's 4 byte lanes); longer messages merge their pieces
pairwise in a tree (one table per doubling of the distance).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator

import numpy as np

from flamingo_jax.data._tf import tf

CORRUPT_RECORD = "corrupt_record"
TRUNCATED_SHARD = "truncated_shard"
UNREADABLE_FILE = "unreadable_file"
DAMAGE_KINDS = (CORRUPT_RECORD, TRUNCATED_SHARD, UNREADABLE_FILE)

_HEADER = 12  # uint64 length + uint32 its checksum
_FOOTER = 4  # uint32 checksum of the data
_MASK_DELTA = 0xA282EAD8
_POLY = 0x82F63B78  # CRC-32C, bit-reflected
_BLOCK = 32  # bytes per vectorised block
_SMALL = 64  # shorter messages: a plain Python loop is faster than numpy's call overhead


# ---------------------------------------------------------------- CRC-32C
def _byte_table() -> np.ndarray:
    """[256] uint32: the register after one byte b, from register 0."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLY), table >> 1).astype(np.uint32)
    return table


_TABLE = _byte_table()
_TABLE_LIST = _TABLE.tolist()


def _zero_bytes(values: np.ndarray, count: int) -> np.ndarray:
    """Registers after `count` zero bytes (only used to build tables)."""
    for _ in range(count):
        values = _TABLE[values & 0xFF] ^ (values >> np.uint32(8))
    return values


def _advance(lanes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Registers [n] pushed through the zero bytes that `lanes` [4, 256] stands for."""
    return (lanes[0][values & 0xFF] ^ lanes[1][(values >> 8) & 0xFF]
            ^ lanes[2][(values >> 16) & 0xFF] ^ lanes[3][values >> 24])


def _block_table() -> np.ndarray:
    """[_BLOCK * 256] uint32: byte b at position k of a block contributes entry k * 256 + b."""
    table = np.zeros((_BLOCK, 256), np.uint32)
    current = _TABLE.copy()
    for position in range(_BLOCK - 1, -1, -1):
        table[position] = current
        current = _zero_bytes(current, 1)
    return table.reshape(-1)


def _span_tables() -> np.ndarray:
    """[_SPAN, 4, 256] uint32: entry s pushes a register's 4 byte lanes through s blocks of zero bytes."""
    byte_values = np.arange(256, dtype=np.uint32)
    identity = np.stack([byte_values << np.uint32(8 * lane) for lane in range(4)])
    spans = np.stack([identity, np.stack([_zero_bytes(row, _BLOCK) for row in identity])])
    while len(spans) < _SPAN:  # doubling: spans n.. 2n-1 are spans 0.. n-1 pushed through n more blocks
        push = _advance(spans[1], spans[-1].reshape(-1)).reshape(4, 256)  # through n blocks
        spans = np.concatenate([spans, _advance(push, spans.reshape(-1)).reshape(spans.shape)])
    return spans


def _tree_tables(first: np.ndarray, levels: int = 32) -> list[np.ndarray]:
    """Lane tables pushing through `first`'s distance times 2^l, for l = 0, 1, ..."""
    tables = [first]
    for _ in range(levels - 1):  # twice the distance: push each entry through the previous distance again
        tables.append(_advance(tables[-1], tables[-1].reshape(-1)).reshape(4, 256))
    return tables


_SPAN = 1024  # blocks merged by one gather: messages up to 32 KiB, or 32 KiB pieces of longer ones
_BLOCK_TABLE = _block_table()
_BLOCK_OFFSETS = np.arange(_BLOCK, dtype=np.intp) * 256
_SPANS = _span_tables()
_SPAN_INDEX = ((np.arange(_SPAN)[::-1, None] * 4 + np.arange(4)) * 256).astype(np.intp)  # [_SPAN, 4]
_LANE_SHIFTS = np.arange(0, 32, 8, dtype=np.uint32)
_TREE = _tree_tables(_advance(_SPANS[1], _SPANS[-1].reshape(-1)).reshape(4, 256))  # 32 KiB, 64 KiB, ...
_HEADER_TABLE = _BLOCK_TABLE.reshape(_BLOCK, 256)[_BLOCK - 8:]  # [8, 256]: the positions of an 8-byte message


def crc32c(data: bytes) -> int:
    """CRC-32C of `data` (the checksum TFRecord framing uses), as an unsigned int."""
    size = len(data)
    if size < _SMALL:
        crc = 0xFFFFFFFF
        for byte in data:
            crc = _TABLE_LIST[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    padding = -size % (_BLOCK * _SPAN) if size > _BLOCK * _SPAN else -size % _BLOCK
    message = np.zeros(size + padding, np.uint8)  # leading zeros from register 0 leave it 0
    message[padding:] = np.frombuffer(data, np.uint8)
    message[padding:padding + 4] ^= 0xFF  # initial register 0xFFFFFFFF == complemented first 4 bytes
    blocks = np.bitwise_xor.reduce(_BLOCK_TABLE[message.reshape(-1, _BLOCK) + _BLOCK_OFFSETS], axis=1)
    blocks = blocks.reshape(-1, min(len(blocks), _SPAN))  # [pieces, n]: each piece merged in one gather
    lanes = (blocks[..., None] >> _LANE_SHIFTS) & np.uint32(0xFF)  # [pieces, n, 4]
    pieces = np.bitwise_xor.reduce(_SPANS.reshape(-1)[_SPAN_INDEX[-blocks.shape[1]:] + lanes], axis=(1, 2))
    level = 0
    while len(pieces) > 1:
        if len(pieces) % 2:  # one more leading zero piece
            pieces = np.concatenate([np.zeros(1, np.uint32), pieces])
        pieces = _advance(_TREE[level], pieces[0::2]) ^ pieces[1::2]
        level += 1
    return int(pieces[0]) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The checksum as TFRecord stores it (rotated and offset, so a CRC of CRCs is not trivial)."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def _header_candidates(window: np.ndarray) -> np.ndarray:
    """Offsets p in `window` (uint8) whose 12 bytes from p are a header with a valid checksum."""
    count = len(window) - _HEADER + 1
    if count <= 0:
        return np.zeros([0], np.intp)
    crc = np.zeros(count, np.uint32)  # the initial register is in the complemented first 4 bytes
    for k in range(8):
        byte = window[k:k + count] ^ np.uint8(0xFF if k < 4 else 0)
        crc ^= _HEADER_TABLE[k][byte]
    crc ^= np.uint32(0xFFFFFFFF)
    masked = ((crc >> np.uint32(15)) | (crc << np.uint32(17))) + np.uint32(_MASK_DELTA)
    stored = (window[8:8 + count].astype(np.uint32) | window[9:9 + count].astype(np.uint32) << 8
              | window[10:10 + count].astype(np.uint32) << 16 | window[11:11 + count].astype(np.uint32) << 24)
    return np.nonzero(masked == stored)[0]


# ---------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class Record:
    """One item of a file's stream: a record (`damage` empty) or a damaged stretch of the file.

    `index` counts the items of the file before this one; `offset` is the byte where it starts.
    """

    index: int
    offset: int
    data: bytes = b""
    damage: str = ""
    detail: str = ""


class _Window:
    """The bytes [start, end) of a file held in memory, read on demand in chunks."""

    def __init__(self, file, chunk_size: int):
        self.file, self.chunk_size = file, chunk_size
        self.data, self.start, self.eof = b"", 0, False

    @property
    def end(self) -> int:
        return self.start + len(self.data)

    def ensure(self, end: int) -> bool:
        """Reads until byte `end` (exclusive) is held; False if the file ends before it."""
        while self.end < end and not self.eof:
            chunk = self.file.read(max(self.chunk_size, end - self.end))
            if chunk:
                self.data += chunk
            else:
                self.eof = True
        return self.end >= end

    def get(self, begin: int, end: int) -> bytes:
        return self.data[begin - self.start:end - self.start]

    def forget_before(self, offset: int) -> None:
        if offset - self.start >= self.chunk_size:
            self.data, self.start = self.data[offset - self.start:], offset


def _whole_record_at(window: _Window, offset: int, size: int) -> bool:
    """Whether a record whose header checksum holds at `offset` also has its whole, valid data."""
    (length,) = struct.unpack("<Q", window.get(offset, offset + 8))
    end = offset + _HEADER + length + _FOOTER
    if end > size or not window.ensure(end):
        return False
    (stored,) = struct.unpack("<I", window.get(end - _FOOTER, end))
    return masked_crc32c(window.get(offset + _HEADER, end - _FOOTER)) == stored


def _next_whole_record(window: _Window, start: int, size: int) -> int | None:
    """The first offset >= `start` where a whole record checks out, or None before the end of the file."""
    position = start
    while True:
        window.ensure(position + window.chunk_size)
        scanned_end = window.end
        scanned = np.frombuffer(window.get(position, scanned_end), np.uint8)
        for candidate in _header_candidates(scanned):
            if _whole_record_at(window, position + int(candidate), size):
                return position + int(candidate)
        if window.eof and window.end == scanned_end:
            return None
        position = max(position, scanned_end - _HEADER + 1)  # a header may straddle the end of what was scanned
        window.forget_before(position)


def read_records(path: str, chunk_size: int = 1 << 20) -> Iterator[Record]:
    """The records of one TFRecord file (uncompressed), with its damage as items of the stream.

    Never raises for the file's content or for I/O: every problem becomes one
    `Record` with `damage` set, after which reading resumes at the next whole
    record or the file ends (see the module docstring).
    """
    t = tf()
    index = offset = 0
    try:
        size = t.io.gfile.stat(path).length
        file = t.io.gfile.GFile(path, "rb")
    except (t.errors.OpError, OSError) as error:
        yield Record(0, 0, damage=UNREADABLE_FILE, detail=f"cannot open the file: {_one_line(error)}")
        return
    with file:
        window = _Window(file, chunk_size)
        try:
            while True:
                if not window.ensure(offset + _HEADER):
                    if window.end > offset:
                        yield Record(index, offset, damage=TRUNCATED_SHARD, detail=(
                            f"the file ends {window.end - offset} bytes into a record header"))
                    return
                header = window.get(offset, offset + _HEADER)
                length, stored = struct.unpack("<QI", header)
                if masked_crc32c(header[:8]) != stored:
                    resume = _next_whole_record(window, offset + 1, size)
                    yield Record(index, offset, damage=CORRUPT_RECORD, detail=(
                        "record header checksum mismatch; " + (
                            f"resumed at the next whole record, byte {resume}" if resume is not None
                            else "no whole record follows, the rest of the file is skipped")))
                    if resume is None:
                        return
                    index, offset = index + 1, resume
                    continue
                end = offset + _HEADER + length + _FOOTER
                if end > size or not window.ensure(end):
                    file_end = window.end if window.eof else size
                    yield Record(index, offset, damage=TRUNCATED_SHARD, detail=(
                        f"a record of {length} bytes is cut off: the file ends at byte {file_end}"))
                    return
                data = window.get(offset + _HEADER, end - _FOOTER)
                (stored,) = struct.unpack("<I", window.get(end - _FOOTER, end))
                if masked_crc32c(data) == stored:
                    yield Record(index, offset, data)
                else:
                    yield Record(index, offset, damage=CORRUPT_RECORD, detail=(
                        f"data checksum mismatch in a record of {length} bytes; resumed after it"))
                index, offset = index + 1, end
                window.forget_before(offset)
        except (t.errors.OpError, OSError) as error:
            yield Record(index, offset, damage=UNREADABLE_FILE, detail=f"read failed: {_one_line(error)}")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__
