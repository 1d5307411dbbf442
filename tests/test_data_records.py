"""The TFRecord framing reader: TensorFlow's own files read back exactly; every kind of
damage becomes one reported item, and reading resumes where the format allows."""

import numpy as np
import pytest

from flamingo_jax.data import records
from flamingo_jax.data._tf import tf


def write(path, payloads):
    with tf().io.TFRecordWriter(str(path)) as writer:
        for payload in payloads:
            writer.write(payload)


def offsets_of(payloads):
    """Byte offset of each record in a file written by `write` (12-byte header, 4-byte footer)."""
    return np.concatenate([[0], np.cumsum([16 + len(p) for p in payloads])]).tolist()


def test_checksums_match_tensorflow_on_every_code_path(tmp_path):
    # Lengths around the pure-Python cut (64), the 32-byte blocks and the 32 KiB spans merged in one gather.
    rng = np.random.default_rng(0)
    lengths = [0, 1, 3, 4, 31, 32, 33, 63, 64, 65, 1000, 32767, 32768, 32769, 70001, 200_003]
    payloads = [rng.bytes(n) for n in lengths]
    write(tmp_path / "a.tfrecord", payloads)  # TensorFlow's writer computes the checksums
    items = list(records.read_records(str(tmp_path / "a.tfrecord"), chunk_size=4096))
    assert [item.damage for item in items] == [""] * len(payloads)
    assert [item.data for item in items] == payloads
    assert [item.offset for item in items] == offsets_of(payloads)[:-1]
    assert [item.index for item in items] == list(range(len(payloads)))
    assert records.masked_crc32c(payloads[10]) != records.masked_crc32c(payloads[10][:-1] + b"\x00")


def _flip(data: bytearray, start: int, count: int) -> None:
    for i in range(start, start + count):
        data[i] ^= 0xFF


# (case, how to damage the bytes of a file of 12 records, the record lost, the damage reported, detail, records kept)
_CASES = [
    ("48 data bytes flipped", lambda raw, at: _flip(raw, at[5] + 12 + 2, 48), 5, "corrupt_record",
     "data checksum mismatch", "all but 5"),
    ("length field flipped", lambda raw, at: _flip(raw, at[5] + 3, 1), 5, "corrupt_record",
     "resumed at the next whole record, byte {next}", "all but 5"),
    ("header checksum flipped", lambda raw, at: _flip(raw, at[7] + 9, 2), 7, "corrupt_record",
     "resumed at the next whole record, byte {next}", "all but 7"),
    ("cut inside a record", lambda raw, at: raw.__delitem__(slice(at[8] + 40, None)), 8, "truncated_shard",
     "a record of", "before 8"),
    ("cut inside a header", lambda raw, at: raw.__delitem__(slice(at[8] + 5, None)), 8, "truncated_shard",
     "5 bytes into a record header", "before 8"),
    ("junk after the last record", lambda raw, at: raw.extend(b"\x00" * 30), 12, "corrupt_record",
     "no whole record follows", "all"),
]


@pytest.mark.parametrize("case, damage, lost, kind, detail, kept", _CASES, ids=[c[0] for c in _CASES])
def test_damage_is_reported_once_and_reading_resumes(tmp_path, case, damage, lost, kind, detail, kept):
    rng = np.random.default_rng(1)
    payloads = [rng.bytes(int(rng.integers(60, 400))) for _ in range(12)]
    path = tmp_path / "shard.tfrecord"
    write(path, payloads)
    at = offsets_of(payloads)
    raw = bytearray(path.read_bytes())
    damage(raw, at)
    path.write_bytes(bytes(raw))
    items = list(records.read_records(str(path), chunk_size=256))  # resynchronising across chunk boundaries
    damaged = [item for item in items if item.damage]
    assert len(damaged) == 1
    assert (damaged[0].damage, damaged[0].offset) == (kind, at[lost])
    assert detail.format(next=at[min(lost + 1, 12)]) in damaged[0].detail
    expected = {"all but 5": payloads[:5] + payloads[6:], "all but 7": payloads[:7] + payloads[8:],
                "before 8": payloads[:8], "all": payloads}[kept]
    assert [item.data for item in items if not item.damage] == expected


def test_a_file_that_cannot_be_opened_is_one_damage_item(tmp_path):
    [item] = records.read_records(str(tmp_path / "vanished.tfrecord"))
    assert item.damage == "unreadable_file" and "vanished.tfrecord" in item.detail
