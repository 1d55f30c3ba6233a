"""Who a caller is. ``tokens`` verifies a JWT (HS256 with a secret, RS256/ES256 with public
keys; never ``alg: none``) into claims and binds them to a ``Principal``: the participant a
connection acts as, its role and, for a customer, its one application. ``apikeys`` holds
the server API's keys (from flags and a file re-read while the server runs). Rules about
what a principal may do live in the chat layer, not here.
"""
