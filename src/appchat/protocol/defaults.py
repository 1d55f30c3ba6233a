"""Every default setting, defined once: ``Settings`` (config.py) takes its defaults from
here, and so do the parts that can be built without it (``WsOptions``, ``Limits``,
``open_store``/``SqliteStore``). Imports nothing: any layer may use it."""

from __future__ import annotations

HOST = "127.0.0.1"
PORT = 8888
DATABASE = "sqlite:///appchat.db"
BROKER = "memory://"
CHANNEL_PREFIX = "appchat"  # broker channels: nodes that talk share one prefix
LOG_LEVEL = "INFO"
LOG_FORMAT = "text"  # or "json": one JSON object a line

# frames and messages
MAX_FRAME = 64 * 1024  # bytes of one incoming frame
MAX_CONTENT = 4000  # characters of one message

# per connection
SEND_QUEUE = 1024  # frames waiting to be written
SEND_BUFFER = 4 * 1024 * 1024  # bytes waiting to be written
HEARTBEAT = 30.0  # seconds of silence before a ping (0: off)
RATE = 50.0  # events a second (0: no limit)
BURST = 100.0

# per node
MAX_CONNECTIONS = 10_000  # when the open-file limit cannot be read
MAX_CONNECTIONS_PER_USER = 32
HANDSHAKE_TIMEOUT = 5.0
EDIT_WINDOW = 900.0  # seconds a message's sender may edit it
PRESENCE_GRACE = 30.0  # seconds a staff member stays "there" after their last connection
MAX_PENDING_HANDSHAKES = 1000

# SQLite
SQLITE_BUSY_TIMEOUT = 30.0  # seconds a write waits for a lock held elsewhere
SQLITE_SYNCHRONOUS = "FULL"

# webhooks
WEBHOOK_TIMEOUT = 10.0  # seconds one delivery may take (connecting, sending, the answer)
WEBHOOK_RETRY_MIN = 1.0  # seconds before the first retry; doubled for each one after
WEBHOOK_RETRY_MAX = 600.0  # seconds between two attempts, at most
NOTIFY_AFTER = 300.0  # seconds without a connection before participant.unread
WEBHOOK_GIVE_UP = 3 * 24 * 3600.0  # seconds after the event when retrying stops (0: never)
# image uploads (POST /upload)
MAX_UPLOAD = 10 * 1024 * 1024  # bytes of one uploaded file
MAX_DECODE_MEMORY = 256 * 1024 * 1024  # bytes decoding one image may take (413 beyond)
MAX_JPEG_SCANS = 100  # scans of a progressive JPEG; each is a pass over the whole image
MAX_UPLOADS_PER_USER = 4  # uploads one identity may have in progress at once (429 beyond)
UPLOAD_RATE = 60.0  # uploads an identity may start a minute, as many at once (0: no limit)
UPLOAD_TIMEOUT = 120.0  # seconds an upload's whole body may take to arrive
UPLOAD_DIR_NAME = "appchat-uploads"  # beside the SQLite file, else in the working directory
THUMBNAIL_SIZE = 320  # pixels, the longer side of a thumbnail
MAX_IMAGE_PIXELS = 50_000_000  # width x height of an accepted image (decoding costs memory)
IMAGES = "any"  # content of an image message: "any" (stored as sent) or "uploads-only"
