"""appchat: a WebSocket chat server for conversations attached to applications."""

__version__ = "0.1.0"
