"""Connections per identity (``--max-connections-per-user``): an allowance is counted by what
the token proves, so a foreign token cannot use up a participant's, and a slot comes back
when its connection ends."""

from __future__ import annotations

import contextlib

from .support import Server, client, eventually, module_server, status, token

PER_USER = 3

limited = module_server("--rate", "0", "--max-connections-per-user", str(PER_USER))


async def test_unbound_customer_cannot_lock_staff_out(limited: Server) -> None:
    # A customer token of application 500 naming no participant, as ?sid=31 (the issue's
    # attack with 32 connections; the module's server allows 3).
    customer = token(request_id=500)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(PER_USER):
            c = await stack.enter_async_context(client(limited, 31, customer))
            await c.ok("Event.GetUnreadInfo", {})
        # Staff 31 is not touched by that: before, this was 429.
        assert await status(limited, 31, token(admin_id=31)) == 101
        # So is a customer of another application naming participant 31.
        assert await status(limited, 31, token(request_id=501, sid=31)) == 101
        # The unbound tokens of application 500 share one allowance, whatever the sid.
        assert await status(limited, 31, customer) == 429
        assert await status(limited, 32, customer) == 429


async def test_each_identity_keeps_its_own_limit_and_gets_it_back(
    limited: Server,
) -> None:
    staff = token(admin_id=33)
    async with contextlib.AsyncExitStack() as stack:
        held = [await stack.enter_async_context(client(limited, 33, staff)) for _ in "abc"]
        assert await status(limited, 33, staff) == 429
        await held[0].close()
        # The slot comes back once the server has ended that connection.
        codes: list[int] = []

        async def taken() -> bool:
            codes.append(await status(limited, 33, staff))
            return codes[-1] != 429

        await eventually(taken, timeout=10, what="the closed connection's slot back")
        assert codes[-1] == 101
