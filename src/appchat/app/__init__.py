"""The wiring: settings from flags and ``APPCHAT_*`` environment variables (``config``) and
the secrets they name (``credentials``), one node built from them and started and stopped
in order (``node``: store, broker, hub, service, webhooks, HTTP), the command line
(``cli``: ``serve``, ``token``, ``migrate``) and several worker processes on one port
(``supervisor``). The only layer that knows every other; nothing imports it.
"""
