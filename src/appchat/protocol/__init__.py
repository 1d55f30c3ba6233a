"""The protocol layer: everything about the wire and the domain that needs no I/O.

Frames in and out (``events``: parsing every request into a frozen dataclass or a precise
``bad_request``, and every reply and push shape), the error codes (``errors``), the data
classes the other layers pass around (``models``), the WebSocket close codes and their
names (``closecodes``) and every default setting (``defaults``). Nothing here imports
another part of the package, so any layer may use it and its tests need no socket.
"""
