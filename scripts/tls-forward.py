#!/usr/bin/env python3
"""A TLS endpoint for a plaintext server: `tls-forward.py LISTEN TARGET CERT KEY` accepts
TLS on LISTEN (host:port) and forwards each connection's bytes to TARGET in the clear.
The test suite puts one in front of a Kafka broker to stand for a managed Kafka's TLS."""
import asyncio
import ssl
import sys


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def main(listen, target, cert, key):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    target_host, target_port = target.rsplit(":", 1)

    async def serve(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection(target_host, int(target_port))
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    host, port = listen.rsplit(":", 1)
    server = await asyncio.start_server(serve, host, int(port), ssl=context)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
