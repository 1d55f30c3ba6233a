"""Pushes to the connections that should get them, on this node and on every other.

``hub`` keeps this node's connections per participant and routes a push to them and, over
the broker (a channel per participant), to the other nodes; ``connection`` is one socket's
bounded write path as the hub sees it (a slow reader is dropped, never waited for);
``envelope`` is the broker message format between nodes. The transport layer hands
connections in; the chat layer hands pushes in through its ``Fanout`` interface.
"""
