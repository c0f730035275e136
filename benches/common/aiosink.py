"""An XOAUTH2 upstream built on aiosmtpd, for `load drain MESSAGES SESSIONS LIMIT_S aiosmtpd` (benches/load.rs).

The in-process sink of `common/sink.rs` is as fast as a server can be here (it answers from memory, in Rust, on
the same two cores); this one is an ordinary third-party SMTP server, the kind of local sink the issue measured
its ceiling against (1,167-1,344 msg/s). It takes any XOAUTH2 token and every message, keeps nothing, and counts.

    python3 aiosink.py            prints `aiosink_addr=127.0.0.1:PORT` once it listens, then serves until killed

Two commands of its own, for the bench's control connection: `XSTAT` answers `250 MESSAGES CONNECTIONS SPAN`
(SPAN: seconds from the first message taken since the last `XRESET` to the latest one, 0 before two), `XRESET`
forgets when the first message came (so that the drain is timed apart from the ceiling run before it).
aiosmtpd offers neither PIPELINING nor CHUNKING, so relay sends each message with MAIL, RCPT and DATA, each after
the previous reply, as smtp-source does for the ceiling.
"""

import asyncio
import base64
import time
import warnings

from aiosmtpd.smtp import SMTP, AuthResult

# aiosmtpd 1.4 warns on every successful login that it fills a deprecated field of its own.
warnings.filterwarnings("ignore", message="Session.login_data")


class Counts:
    messages = 0
    connections = 0
    first = None
    last = None


class Handler:
    async def auth_XOAUTH2(self, server, args):
        # `AUTH XOAUTH2 <initial response>`, or the response after an empty challenge. The token is not
        # checked: the bench measures sending, not a token service.
        if len(args) >= 2:
            raw = args[1]
        else:
            raw = await server.challenge_auth("", encode_to_b64=False)
            if raw is None:
                return AuthResult(success=False, handled=False)
        try:
            fields = base64.b64decode(raw).decode().split("\x01")
        except ValueError:
            return AuthResult(success=False, handled=False)
        user = next((f[5:] for f in fields if f.startswith("user=")), "")
        return AuthResult(success=True, auth_data=user)

    async def handle_DATA(self, server, session, envelope):
        now = time.monotonic()
        Counts.messages += 1
        if Counts.first is None:
            Counts.first = now
        Counts.last = now
        return "250 2.0.0 OK"


class Sink(SMTP):
    def connection_made(self, transport):
        Counts.connections += 1
        super().connection_made(transport)

    async def smtp_XSTAT(self, arg):
        span = 0.0
        if Counts.first is not None and Counts.last is not None:
            span = Counts.last - Counts.first
        await self.push(f"250 {Counts.messages} {Counts.connections} {span:.6f}")

    async def smtp_XRESET(self, arg):
        Counts.first = None
        Counts.last = None
        await self.push("250 OK")


async def main():
    handler = Handler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Sink(
            handler,
            hostname="aiosink",
            auth_require_tls=False,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
        ),
        "127.0.0.1",
        0,
    )
    host, port = server.sockets[0].getsockname()[:2]
    print(f"aiosink_addr={host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
