"""The rules: who may do what, one request in and one reply out.

``service`` (``ChatService``) handles every WebSocket event: it parses the frame (protocol
layer), checks the caller against the conversation (staff see every conversation, a
customer only their application's, and another conversation is never revealed), calls the
store, and hands pushes to the fan-out through the small ``Fanout`` interface it defines.
The server API's operations, for a trusted backend without a connection, share those
rules and limits. Nothing here knows about sockets or HTTP.
"""
