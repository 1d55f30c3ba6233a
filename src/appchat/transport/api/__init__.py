"""The server API: JSON over HTTP under ``/api/`` for trusted backends, with API keys.

One table (``ServerApi.routes``, ``server``) names every operation with the pydantic models
(``models``) of its path, query, headers and body: ``routing`` validates requests with
those models, authenticates the key and answers errors as JSON, and ``openapi`` generates
the document at ``/api/openapi.json`` from the same models. The rules themselves are the
chat layer's (``BackendService``), so a message posted here is stored, ordered and pushed
exactly like a SendMessage.
"""

from .server import ServerApi

__all__ = ["ServerApi"]
