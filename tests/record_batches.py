"""Kafka v2 record batches built by hand, for tests of what the router does with
batches it cannot decode: a CRC that does not match, or a codec claimed that the
payload is not in (clients refuse to build either)."""

from __future__ import annotations

import struct

from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c

CRC_AT = struct.calcsize(">qiib")
ATTRIBUTES_AT = struct.calcsize(">qiibI")
ZSTD = 4


def record_batch(
    values: list[bytes], *, base_offset: int = 0, claimed_codec: int = 0, crc_flip: int = 0
) -> bytes:
    """An uncompressed v2 record batch of `values` from `base_offset` (as a broker
    sets it), optionally claiming `claimed_codec`, or with its CRC xor `crc_flip`."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for delta, value in enumerate(values):
        builder.append(delta, timestamp=None, key=None, value=value, headers=[])
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base_offset)
    (attributes,) = struct.unpack_from(">h", data, ATTRIBUTES_AT)
    struct.pack_into(">h", data, ATTRIBUTES_AT, attributes | claimed_codec)
    struct.pack_into(">I", data, CRC_AT, calc_crc32c(bytes(data[ATTRIBUTES_AT:])) ^ crc_flip)
    return bytes(data)
