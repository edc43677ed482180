"""The "naive" Python baseline: a plain asyncio + ``ssl`` relay.

Per client connection: ``asyncio.open_connection(ip, 5433, ssl=ctx)`` (TLS 1.3,
client certificate), the metadata exchange via ``proxy.mdx``, then two
``read(65536)`` / ``write`` + ``drain`` loops; the first direction to end
closes both. Runs under the stock asyncio loop or under uvloop (``--loop``).

    python bench/baselines/naive_relay.py --cert chain.pem --key key.pem --ca root.pem \
        --route 127.0.0.1:6000=127.100.0.2 [--route ...] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from proxy import mdx  # noqa: E402

READY = "The proxy has started successfully and is ready for new connections!"
CHUNK = 65536


def make_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    return ctx


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            return
        writer.write(data)
        await writer.drain()


async def handle(
    creader: asyncio.StreamReader,
    cwriter: asyncio.StreamWriter,
    target: str,
    ctx: ssl.SSLContext,
    request: bytes,
) -> None:
    swriter = None
    try:
        sreader, swriter = await asyncio.open_connection(
            target, 5433, ssl=ctx, server_hostname=target
        )
        swriter.write(request)
        await swriter.drain()
        size = mdx.body_length(await sreader.readexactly(mdx.HEADER_SIZE))
        response = mdx.decode_response(await sreader.readexactly(size))
        if not response.ok:
            raise RuntimeError(f"metadata exchange refused: {response.error}")
        tasks = [
            asyncio.ensure_future(pump(creader, swriter)),
            asyncio.ensure_future(pump(sreader, cwriter)),
        ]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    except (OSError, asyncio.IncompleteReadError, ssl.SSLError, RuntimeError) as exc:
        print(f"connection to {target}: {exc!r}", file=sys.stderr)
    finally:
        for w in (cwriter, swriter):
            if w is not None:
                w.close()


async def main(args: argparse.Namespace) -> None:
    ctx = make_context(args.cert, args.key, args.ca)
    request = mdx.encode_request(
        mdx.MdxRequest(
            user_agent="naive-relay/bench", auth_type=mdx.DB_NATIVE, oauth2_token=args.token
        )
    )
    servers = []
    for route in args.route:
        listen, target = route.split("=", 1)
        host, port = listen.rsplit(":", 1)

        def on_client(r, w, target=target):  # type: ignore[no-untyped-def]
            return handle(r, w, target, ctx, request)

        servers.append(await asyncio.start_server(on_client, host, int(port), backlog=4096))
    print(READY, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--token", default="bench-token")
    parser.add_argument("--route", action="append", required=True, help="LISTEN=TARGETIP")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    ns = parser.parse_args()
    try:
        if ns.loop == "uvloop":
            import uvloop

            uvloop.run(main(ns))
        else:
            asyncio.run(main(ns))
    except KeyboardInterrupt:
        pass
