"""Sans-IO codec for the AlloyDB metadata exchange (MDX).

Theory of operation: after the TLS handshake and before any PostgreSQL byte,
the client writes one frame (4-byte big-endian body length, then a protobuf
``MetadataExchangeRequest``) and the server answers with one frame carrying a
``MetadataExchangeResponse``. Both messages are tiny and flat, so the protobuf
wire format is written and read by hand here: no protobuf runtime is needed.
The client and the emulator's server role share this module, and the tests
pin its output to golden bytes.

Wire format (proto3, fields omitted when they hold their default value):

    MetadataExchangeRequest  { string user_agent = 1; AuthType auth_type = 2;
                               string oauth2_token = 3; }
    MetadataExchangeResponse { ResponseCode response_code = 1; string error = 2; }
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# AuthType
AUTH_TYPE_UNSPECIFIED = 0
DB_NATIVE = 1
AUTO_IAM = 2

# ResponseCode
RESPONSE_CODE_UNSPECIFIED = 0
OK = 1
ERROR = 2

#: The Go connector reads the response into a 16 KiB buffer; we refuse larger
#: frames in both directions instead of trusting the peer's length.
MAX_MESSAGE_SIZE = 16 * 1024

HEADER_SIZE = 4

_WIRE_VARINT = 0
_WIRE_LEN = 2


class MdxDecodeError(ValueError):
    """A metadata-exchange frame or message is malformed."""


@dataclass(frozen=True)
class MdxRequest:
    user_agent: str = ""
    auth_type: int = AUTH_TYPE_UNSPECIFIED
    oauth2_token: str = ""


@dataclass(frozen=True)
class MdxResponse:
    response_code: int = RESPONSE_CODE_UNSPECIFIED
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.response_code == OK


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise MdxDecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise MdxDecodeError("varint too long")


def _string_field(number: int, value: str) -> bytes:
    raw = value.encode("utf-8")
    return _varint(number << 3 | _WIRE_LEN) + _varint(len(raw)) + raw


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3 | _WIRE_VARINT) + _varint(value)


def _fields(body: bytes) -> dict[int, int | bytes]:
    """Decode a flat message into {field number: last value}; unknown fields are kept."""
    fields: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(body):
        key, pos = _read_varint(body, pos)
        number, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            value, pos = _read_varint(body, pos)
            fields[number] = value
        elif wire == _WIRE_LEN:
            size, pos = _read_varint(body, pos)
            if pos + size > len(body):
                raise MdxDecodeError("truncated length-delimited field")
            fields[number] = body[pos : pos + size]
            pos += size
        else:
            raise MdxDecodeError(f"unsupported wire type {wire}")
    return fields


def _text(fields: dict[int, int | bytes], number: int) -> str:
    value = fields.get(number, b"")
    if not isinstance(value, bytes):
        raise MdxDecodeError(f"field {number} should be a string")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MdxDecodeError(f"field {number} is not valid UTF-8") from exc


def _enum(fields: dict[int, int | bytes], number: int) -> int:
    value = fields.get(number, 0)
    if not isinstance(value, int):
        raise MdxDecodeError(f"field {number} should be a varint")
    return value


def frame(body: bytes) -> bytes:
    """Prefix a message body with its 4-byte big-endian length."""
    if len(body) > MAX_MESSAGE_SIZE:
        raise MdxDecodeError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_SIZE}")
    return struct.pack(">I", len(body)) + body


def body_length(header: bytes) -> int:
    """Read the length prefix and check it against MAX_MESSAGE_SIZE."""
    if len(header) != HEADER_SIZE:
        raise MdxDecodeError("metadata exchange header must be 4 bytes")
    size: int = struct.unpack(">I", header)[0]
    if size > MAX_MESSAGE_SIZE:
        raise MdxDecodeError(
            f"metadata exchange message length {size} exceeds the maximum of {MAX_MESSAGE_SIZE}"
        )
    return size


def encode_request(request: MdxRequest) -> bytes:
    """Serialize and frame a request, ready for one write."""
    body = b""
    if request.user_agent:
        body += _string_field(1, request.user_agent)
    if request.auth_type:
        body += _varint_field(2, request.auth_type)
    if request.oauth2_token:
        body += _string_field(3, request.oauth2_token)
    return frame(body)


def decode_request(body: bytes) -> MdxRequest:
    fields = _fields(body)
    return MdxRequest(
        user_agent=_text(fields, 1), auth_type=_enum(fields, 2), oauth2_token=_text(fields, 3)
    )


def encode_response(response: MdxResponse) -> bytes:
    """Serialize and frame a response, ready for one write."""
    body = b""
    if response.response_code:
        body += _varint_field(1, response.response_code)
    if response.error:
        body += _string_field(2, response.error)
    return frame(body)


def decode_response(body: bytes) -> MdxResponse:
    fields = _fields(body)
    return MdxResponse(response_code=_enum(fields, 1), error=_text(fields, 2))
