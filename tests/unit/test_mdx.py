"""Golden bytes of the metadata exchange, from protocol.md §5.6 (real protobuf output)."""

import pytest

from proxy import mdx


def test_request_auto_iam_golden():
    frame = mdx.encode_request(mdx.MdxRequest("x/1.0", mdx.AUTO_IAM, "tok"))
    assert frame == bytes.fromhex("0000000e 0a05782f312e30 1002 1a03746f6b")


def test_request_db_native_golden():
    frame = mdx.encode_request(mdx.MdxRequest("x/1.0", mdx.DB_NATIVE, "tok"))
    assert frame == bytes.fromhex("0000000e 0a05782f312e30 1001 1a03746f6b")


def test_official_connector_capture_decodes():
    capture = bytes.fromhex(
        "0000002f0a26616c6c6f7964622d707974686f6e2d636f6e6e6563746f72"
        "2f312e31342e312b706738303030100 21a03746f6b".replace(" ", "")
    )
    assert mdx.body_length(capture[:4]) == 47
    req = mdx.decode_request(capture[4:])
    assert req == mdx.MdxRequest("alloydb-python-connector/1.14.1+pg8000", mdx.AUTO_IAM, "tok")
    assert mdx.encode_request(req) == capture


def test_responses_golden():
    assert mdx.encode_response(mdx.MdxResponse(mdx.OK)) == bytes.fromhex("00000002 0801")
    assert mdx.encode_response(mdx.MdxResponse(mdx.ERROR, "bad")) == bytes.fromhex(
        "00000007 0802 1203626164"
    )
    empty = mdx.decode_response(b"")
    assert empty.response_code == mdx.RESPONSE_CODE_UNSPECIFIED and not empty.ok


def test_long_token_uses_multibyte_varint():
    frame = mdx.encode_request(mdx.MdxRequest(oauth2_token="t" * 300))
    assert frame[4:7] == bytes.fromhex("1aac02")
    assert mdx.decode_request(frame[4:]).oauth2_token == "t" * 300


def test_oversized_length_is_refused():
    with pytest.raises(mdx.MdxDecodeError, match="exceeds the maximum"):
        mdx.body_length((mdx.MAX_MESSAGE_SIZE + 1).to_bytes(4, "big"))


@pytest.mark.parametrize("body", [b"\x0a\x05ab", b"\x08", b"\x0b", b"\x12\x02\xff\xfe"])
def test_malformed_bodies_raise(body):
    with pytest.raises(mdx.MdxDecodeError):
        mdx.decode_response(body)


def test_unknown_fields_are_skipped():
    assert mdx.decode_response(b"\x08\x01\x18\x05\x22\x01x").ok


# Found by mutation testing (mutmut on proxy/mdx.py): each of these once survived.


def test_three_byte_varints_decode():
    # auth_type 20000 = a0 9c 01: a varint of three bytes (the shift must accumulate).
    assert mdx.decode_request(bytes.fromhex("10a09c01")).auth_type == 20000


def test_absent_fields_decode_as_their_defaults():
    request = mdx.decode_request(bytes.fromhex("1002"))
    assert (request.user_agent, request.oauth2_token) == ("", "")


def test_a_string_longer_than_the_body_is_refused():
    with pytest.raises(mdx.MdxDecodeError, match="truncated"):
        mdx.decode_request(bytes.fromhex("0a0578"))  # says 5 bytes, has 1


def test_decode_errors_say_what_is_wrong():
    with pytest.raises(mdx.MdxDecodeError, match="truncated varint"):
        mdx.decode_request(bytes.fromhex("1080"))
    with pytest.raises(mdx.MdxDecodeError, match="should be a varint"):
        mdx.decode_request(bytes.fromhex("1201" + "61"))
    with pytest.raises(mdx.MdxDecodeError, match="must be 4 bytes"):
        mdx.body_length(b"\x00\x00\x01")


def test_the_size_limit_is_inclusive_and_the_length_unsigned():
    largest = bytes(mdx.MAX_MESSAGE_SIZE)
    assert mdx.frame(largest)[:4] == mdx.MAX_MESSAGE_SIZE.to_bytes(4, "big")
    assert mdx.body_length(mdx.MAX_MESSAGE_SIZE.to_bytes(4, "big")) == mdx.MAX_MESSAGE_SIZE
    with pytest.raises(mdx.MdxDecodeError, match="exceeds"):
        mdx.body_length(bytes.fromhex("80000000"))  # not a negative size


def test_ten_byte_varints_decode_and_other_errors_are_named():
    # A negative enum is sent as a ten-byte varint; its last byte has shift 63.
    assert mdx.decode_request(bytes.fromhex("10ffffffffffffffffff01")).auth_type == 2**64 - 1
    with pytest.raises(mdx.MdxDecodeError, match="varint too long"):
        mdx.decode_request(bytes.fromhex("10" + "ff" * 10 + "01"))
    with pytest.raises(mdx.MdxDecodeError, match="unsupported wire type 5"):
        mdx.decode_request(bytes.fromhex("0d00000000"))
    with pytest.raises(mdx.MdxDecodeError, match="field 1 should be a string"):
        mdx.decode_request(bytes.fromhex("0801"))
    with pytest.raises(mdx.MdxDecodeError, match=r"message of 16385 bytes exceeds 16384"):
        mdx.frame(bytes(mdx.MAX_MESSAGE_SIZE + 1))
