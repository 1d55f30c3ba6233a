"""Connections per identity on this node (``--max-connections-per-user``).

The allowance belongs to what the token proves, not to the ``sid`` in the query: a
token naming its participant (a ``sid``/``sub`` claim, or a staff token's own
``admin_id``) counts against that participant of that token's issuer; a customer token
naming none counts against its application (every such token of application N shares
one allowance). So no token can use up the allowance of anyone it does not speak for.
"""

from __future__ import annotations

from collections import Counter

from ..protocol.models import Principal


def quota_key(principal: Principal) -> str:
    """``admin:1/sid:1``, ``request:100/sid:7``; ``request:100`` for an unbound customer."""
    if principal.bound:
        return f"{principal.subject}/sid:{principal.sid}"
    return principal.subject


class ConnectionQuota:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    def take(self, key: str) -> bool:
        """Count one more connection for ``key``; False (and nothing counted) if it has
        its limit already."""
        if self._open[key] >= self.limit:
            return False
        self._open[key] += 1
        return True

    def give_back(self, key: str) -> None:
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]

    def count(self, key: str) -> int:
        return self._open.get(key, 0)
