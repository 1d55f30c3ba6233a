"""Webhooks: the events the stores record in their outbox (in each change's own
transaction), delivered as signed POSTs to the configured URLs with retries and backoff,
claimed so that one node of several delivers each (``dispatcher``).
"""
