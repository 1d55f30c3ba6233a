"""The network edge, on aiohttp: the WebSocket endpoint (``ws``: handshake refused before
the upgrade, the read loop, limits and close codes), connections that never finish their
request (``guard``), connections per identity (``quota``), the connection log
(``connlog``), health and metrics (``http``), image uploads and downloads (``uploads``),
the web client's pages (``web``) and the server API for trusted backends (``api``).
"""
