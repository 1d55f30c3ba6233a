"""Small helpers any layer below the wiring may use, each with one job and no I/O of its
own: Prometheus metrics (``metrics``), the text and JSON log formats (``logformat``), log
lines limited per key (``ratelog``) and token buckets for request rates (``ratelimit``).
They import nothing of the package but the protocol layer.
"""
