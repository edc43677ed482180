"""The Admin API client's transport: a total deadline per request, and clear errors."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from proxy import adminapi
from proxy.adminapi import AdminAPIClient
from proxy.config import parse_instance_uri
from proxy.credentials import StaticTokenSource
from proxy.errors import AdminAPIUnreachable

URI = parse_instance_uri("projects/p/locations/r/clusters/c/instances/i")


@pytest.fixture
def trickling_server():
    """Answers 200 with a body that comes one byte every 0.2 s, for a minute."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n{")
            for _ in range(300):
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


async def test_a_trickling_answer_hits_the_total_deadline(trickling_server, monkeypatch):
    # Each byte comes well within the per-socket timeout; only a total deadline ends it.
    monkeypatch.setattr(adminapi, "REQUEST_TIMEOUT", 1.0)
    client = AdminAPIClient(trickling_server, StaticTokenSource("t"), "test-agent")
    began = time.monotonic()
    with pytest.raises(AdminAPIUnreachable, match="no answer within 1s|not complete after 1s"):
        await asyncio.wait_for(client.connection_info(URI), 10)
    assert time.monotonic() - began < 3
    # The worker thread is not left reading the trickle either.
    began = time.monotonic()
    with pytest.raises(Exception, match="not complete"):
        client._send("GET", trickling_server, {}, None, time.monotonic() + 1.0)
    assert time.monotonic() - began < 3
    client.close()


async def test_an_unreachable_endpoint_names_the_url_and_the_reason():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = AdminAPIClient(f"http://127.0.0.1:{port}", StaticTokenSource("t"), "test-agent")
    with pytest.raises(AdminAPIUnreachable) as caught:
        await client.connection_info(URI)
    assert str(caught.value) == (
        f'GET "http://127.0.0.1:{port}/v1beta/{URI.name}/connectionInfo": connection refused'
    )
    client.close()


@pytest.mark.parametrize(
    ("error", "codes"),
    [
        (
            {
                "code": 429,
                "message": "Quota exceeded",
                "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "A"},
                    {"@type": "type.googleapis.com/google.rpc.Help"},
                ],
            },
            "A",
        ),
        ({"code": 403, "message": "m", "errors": [{"reason": "x"}, {"reason": "y"}]}, "x,y"),
        ({"code": 403, "message": "m", "status": "PERMISSION_DENIED"}, "PERMISSION_DENIED"),
    ],
)
def test_error_reasons_for_the_metric_come_from_the_details(error, codes):
    import json

    from proxy.errors import AdminAPIError

    with pytest.raises(AdminAPIError) as caught:
        AdminAPIClient._decode(error["code"], json.dumps({"error": error}).encode())
    assert caught.value.codes == codes
    assert str(caught.value).startswith(f"googleapi: Error {error['code']}: m") or "Quota" in str(
        caught.value
    )


@pytest.mark.parametrize(
    ("status", "raw", "message"),
    [
        (200, b"\xff\xfe garbage", "response is not a JSON object"),  # not UTF-8 (found by fuzzing)
        (200, b"[1, 2]", "response is not a JSON object"),
        (503, b"\xff upstream down", "upstream down"),
    ],
)
def test_answers_that_are_not_json_objects_are_api_errors(status, raw, message):
    from proxy.errors import AdminAPIError

    with pytest.raises(AdminAPIError) as caught:
        AdminAPIClient._decode(status, raw)
    assert caught.value.status == status and message in str(caught.value)
