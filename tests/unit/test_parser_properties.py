"""Property-based tests (hypothesis) of the parsers that read outside input.

Each parser either returns a value that round-trips, or rejects the input with
its own clear error type; nothing else (no IndexError, struct.error, hang or
crash) may come out of any input. Examples are generated, and shrunk to the
smallest failing input when one fails; the budget is hypothesis' default.
"""

from __future__ import annotations

import contextlib
import struct

from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy import mdx, pgstartup
from proxy.config import parse_instance_arg
from proxy.errors import BadCommandError
from proxy.settings import format_go_duration, parse_go_bool, parse_go_duration
from tests.fuzz.targets import read_startup_from

text = st.text(max_size=200)
# Field values of the metadata exchange: any string, any enum value a varint holds.
varint64 = st.integers(min_value=0, max_value=2**63 - 1)


# -- the metadata exchange --------------------------------------------------


@given(user_agent=text, auth_type=varint64, token=text)
def test_mdx_request_round_trips(user_agent, auth_type, token):
    request = mdx.MdxRequest(user_agent=user_agent, auth_type=auth_type, oauth2_token=token)
    framed = mdx.encode_request(request)
    size = mdx.body_length(framed[: mdx.HEADER_SIZE])
    assert size == len(framed) - mdx.HEADER_SIZE
    assert mdx.decode_request(framed[mdx.HEADER_SIZE :]) == request


@given(code=varint64, error=text)
def test_mdx_response_round_trips(code, error):
    response = mdx.MdxResponse(response_code=code, error=error)
    framed = mdx.encode_response(response)
    assert mdx.decode_response(framed[mdx.HEADER_SIZE :]) == response


@given(body=st.binary(max_size=300))
@example(body=b"\x80" * 11)  # a varint longer than 64 bits
@example(body=b"\x0a\xff\xff\xff\xff\x0f")  # a length far past the end
@example(body=b"\x0b")  # wire type 3 (a group)
@example(body=b"\x12\x01\xff")  # a string field that is not UTF-8
def test_mdx_decoders_accept_or_raise_their_own_error(body):
    for decode in (mdx.decode_request, mdx.decode_response):
        with contextlib.suppress(mdx.MdxDecodeError):
            decode(body)


MALFORMED = {
    b"\x80" * 11: "varint too long",
    b"\x0a\xff\xff\xff\xff\x0f": "truncated length-delimited field",
    b"\x0a\x05abc": "truncated length-delimited field",
    b"\x0b": "unsupported wire type 3",
    b"\x0a\x01\xff": "not valid UTF-8",
    b"\x08": "truncated varint",
}


def test_each_kind_of_malformed_mdx_body_is_refused_with_its_reason():
    for body, reason in MALFORMED.items():
        try:
            mdx.decode_request(body)
        except mdx.MdxDecodeError as exc:
            assert reason in str(exc), (body, exc)
        else:
            raise AssertionError(f"{body!r} was accepted")


@given(header=st.binary(min_size=4, max_size=4))
def test_mdx_length_prefix_is_bounded(header):
    try:
        size = mdx.body_length(header)
    except mdx.MdxDecodeError as exc:
        assert "exceeds the maximum" in str(exc)
        assert struct.unpack(">I", header)[0] > mdx.MAX_MESSAGE_SIZE
    else:
        assert 0 <= size <= mdx.MAX_MESSAGE_SIZE


# -- the PostgreSQL startup packets read under AUTO_IAM -----------------------


# What a StartupMessage parameter can hold: UTF-8 text without NUL.
pg_char = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")
ssl_request = struct.pack(">II", 8, pgstartup.SSL_REQUEST)
gssenc_request = struct.pack(">II", 8, pgstartup.GSSENC_REQUEST)


@settings(max_examples=60, deadline=None)
@given(
    requests=st.lists(st.sampled_from([ssl_request, gssenc_request]), max_size=3),
    params=st.dictionaries(
        st.text(pg_char, min_size=1, max_size=20), st.text(pg_char, max_size=40), max_size=5
    ),
)
def test_startup_after_encryption_requests_is_returned_whole(requests, params):
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    startup = struct.pack(">II", 8 + len(body), pgstartup.PROTOCOL_3) + body
    if len(startup) > pgstartup.MAX_STARTUP:
        return
    packet, answered, outcome = read_startup_from(b"".join(requests) + startup)
    assert (packet, outcome) == (startup, "")
    assert answered == b"N" * len(requests)
    assert pgstartup.startup_user(packet) == params.get("user")


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=64))
@example(data=struct.pack(">II", 0xFFFFFFFF, pgstartup.PROTOCOL_3))  # a huge length
@example(data=struct.pack(">II", 4, pgstartup.PROTOCOL_3))  # shorter than its header
def test_any_client_bytes_give_a_packet_or_client_left(data):
    packet, _, outcome = read_startup_from(data)
    if outcome == "left":
        assert packet is None
    else:
        assert packet and packet in data
        pgstartup.startup_user(packet)  # never raises


@given(packet=st.binary(max_size=200))
def test_startup_user_never_raises(packet):
    user = pgstartup.startup_user(packet)
    assert user is None or isinstance(user, str)
    pgstartup.iam_user_hint(user)


# -- command-line values ----------------------------------------------------

uri_part = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-"), min_size=1, max_size=12
)


@given(
    project=uri_part,
    region=uri_part,
    cluster=uri_part,
    instance=uri_part,
    port=st.integers(min_value=0, max_value=65535),
)
def test_a_well_formed_instance_argument_is_accepted(project, region, cluster, instance, port):
    uri = f"projects/{project}/locations/{region}/clusters/{cluster}/instances/{instance}"
    cfg = parse_instance_arg(f"{uri}?port={port}")
    assert cfg.uri.name == uri
    assert cfg.port == (port or None)


@given(arg=st.text(max_size=120))
@example(arg="projects/p/locations/r/clusters/c/instances/i?port=%zz")
@example(arg="projects/p/locations/r/clusters/c/instances/i?port=99999999999999999999")
@example(arg="projects/p/locations/r/clusters/c/instances/i?address=1.2.3.4&address=::1")
def test_any_instance_argument_is_accepted_or_refused_with_a_message(arg):
    try:
        parse_instance_arg(arg)
    except BadCommandError as exc:
        assert str(exc)


@given(seconds=st.integers(min_value=0, max_value=10**7))
def test_go_durations_round_trip(seconds):
    assert parse_go_duration(format_go_duration(seconds)) == seconds


@given(value=st.text(max_size=30))
@example(value="1.5.5s")
@example(value="-1s")
@example(value="10")
def test_go_duration_parser_returns_seconds_or_a_go_error(value):
    try:
        seconds = parse_go_duration(value)
    except ValueError as exc:
        assert str(exc).startswith("time: ")
    else:
        assert seconds >= 0


@given(value=st.text(max_size=10))
@example(value="True")
@example(value="F")
def test_go_bools_are_true_false_or_invalid_syntax(value):
    try:
        parsed = parse_go_bool(value)
    except ValueError as exc:
        assert "invalid syntax" in str(exc)
        assert value not in GO_TRUE | GO_FALSE
    else:
        assert parsed is (value in GO_TRUE)
        assert value in GO_TRUE | GO_FALSE


# strconv.ParseBool's spellings, written out here rather than imported
GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}
