"""The network edge: the WebSocket endpoint and the small HTTP surface."""
