"""Reading what is readable of an MCAP file whose end is missing (a recording cut off: power loss, a full disk).

rosbags' MCAP reader starts from the footer and the summary at the end of the file, so a file truncated anywhere
cannot be opened at all ("File end magic is invalid"), though every complete record before the cut is intact.
:class:`SalvagedMcap` walks the records from the start instead (MCAP's format: the magic, then records of
opcode u8, length u64, body), keeps schemas, channels and messages (also inside chunks, uncompressed, lz4 or zstd
as rosbags decompresses them), and stops at the first record that runs past the end of the file or does not parse.
It offers what :class:`ecmnet_core.bags.reader.BagReader` uses of a rosbags reader (connections with message
counts, message count, start time, duration, messages in receive-time order), and says where the file ends early.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"\x89MCAP0\r\n"
OP_SCHEMA, OP_CHANNEL, OP_MESSAGE, OP_CHUNK, OP_DATA_END, OP_FOOTER = 0x03, 0x04, 0x05, 0x06, 0x0F, 0x02


class SalvageError(ValueError):
    """Not an MCAP file, or nothing before the cut can be read."""


@dataclass
class Connection:
    """What BagReader reads of a rosbags connection."""

    id: int
    topic: str
    msgtype: str
    msgcount: int = 0


class _Body:
    """A little-endian cursor over one record body; IndexError/struct.error past its end."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise IndexError("record body ends early")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        return self.take(self.u32()).decode("utf-8")


class SalvagedMcap:
    """The complete records of an MCAP file up to where it ends early; ``truncated_at`` is the byte offset of the
    first unreadable record (None when the file was read to its footer)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        data = self.path.read_bytes()
        if not data.startswith(MAGIC):
            raise SalvageError(f"{self.path} is not an MCAP file (no MCAP magic at its start)")
        self.size = len(data)
        self.truncated_at: int | None = None
        self.reason = ""
        self._schemas: dict[int, str] = {}
        self._channels: dict[int, Connection] = {}
        self._messages: list[tuple[int, int, bytes]] = []  # (log_time, channel id, data)
        self._walk(data, len(MAGIC), top=True)
        self._messages.sort(key=lambda m: m[0])
        for _, channel, _ in self._messages:
            self._channels[channel].msgcount += 1
        if not self._messages:
            raise SalvageError(f"{self.path}: no complete message before byte {self.truncated_at or self.size}")
        self.is_open = True

    def _walk(self, data: bytes, pos: int, top: bool) -> None:
        end = len(data)
        while pos < end:
            if pos + 9 > end:
                return self._cut(pos, "a record header runs past the end", top)
            op = data[pos]
            (length,) = struct.unpack_from("<Q", data, pos + 1)
            if pos + 9 + length > end:
                if op == OP_CHUNK:  # an uncompressed chunk cut short still holds whole records
                    self._partial_chunk(data[pos + 9:end])
                return self._cut(pos, f"record 0x{op:02x} of {length} bytes runs past the end", top)
            body = data[pos + 9:pos + 9 + length]
            try:
                if self._record(op, body) and top:
                    return None  # footer: the file is complete
            except (IndexError, struct.error, UnicodeDecodeError, ValueError) as exc:
                return self._cut(pos, f"record 0x{op:02x} does not parse ({exc})", top)
            pos += 9 + length
        return None

    def _partial_chunk(self, body: bytes) -> None:
        try:
            b = _Body(body)
            b.u64(), b.u64(), b.u64(), b.u32()
            compression = b.string()
            b.u64()
        except (IndexError, struct.error, UnicodeDecodeError):
            return
        if compression == "":
            self._walk(body[b.pos:], 0, top=False)

    def _cut(self, pos: int, reason: str, top: bool) -> None:
        if top or self.truncated_at is None:
            self.truncated_at, self.reason = pos, reason

    def _record(self, op: int, body: bytes) -> bool:
        """Keep one record; True at the footer."""
        b = _Body(body)
        if op == OP_SCHEMA:
            sid = b.u16()
            self._schemas[sid] = b.string()
        elif op == OP_CHANNEL:
            cid, sid, topic = b.u16(), b.u16(), b.string()
            self._channels[cid] = Connection(cid, topic, self._schemas.get(sid, ""))
        elif op == OP_MESSAGE:
            cid, _seq, log_time, _pub = b.u16(), b.u32(), b.u64(), b.u64()
            if cid in self._channels:
                self._messages.append((log_time, cid, body[b.pos:]))
        elif op == OP_CHUNK:
            b.u64(), b.u64()
            size, _crc, compression = b.u64(), b.u32(), b.string()
            records = b.take(b.u64())
            self._walk(_decompress(records, compression, size), 0, top=False)
        return op == OP_FOOTER

    # ------------------------------------------------------------------- what BagReader uses of a rosbags reader
    @property
    def connections(self) -> list[Connection]:
        return list(self._channels.values())

    @property
    def message_count(self) -> int:
        return len(self._messages)

    @property
    def start_time(self) -> int:
        return self._messages[0][0]

    @property
    def duration(self) -> int:
        return self._messages[-1][0] - self._messages[0][0] + 1

    def messages(self, connections: Iterable[Connection] = (), start: int | None = None,
                 stop: int | None = None) -> Iterator[tuple[Connection, int, bytes]]:
        wanted = {c.id for c in connections}
        for t, cid, data in self._messages:
            if cid in wanted and (start is None or t >= start) and (stop is None or t < stop):
                yield self._channels[cid], t, data

    def describe(self) -> str:
        """One line on what was read and where the file ends early."""
        where = f"ends early at byte {self.truncated_at} of {self.size} ({self.reason})" \
            if self.truncated_at is not None else "was read to its end"
        return f"{self.path} {where}: read {self.message_count} complete messages before it"

    def close(self) -> None:
        self.is_open = False


def _decompress(data: bytes, compression: str, size: int) -> bytes:
    from rosbags.rosbag2.storage_mcap import DECOMPRESSORS

    if compression not in DECOMPRESSORS:
        raise ValueError(f"chunk compression {compression!r} is not supported")
    return DECOMPRESSORS[compression](data, size)


__all__ = ["Connection", "SalvageError", "SalvagedMcap"]
