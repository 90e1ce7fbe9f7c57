"""The gateway's HTTP/1.1 transport: sockets, parsing, pooling, TLS, deadlines.

`server.py` is the client side (an asyncio.Protocol on llhttp: limits, pipelining,
back-pressure); `upstream.py` the keep-alive pool to the API; `plain_http.py` the
plain-HTTP listener beside TLS (redirect or refuse); `tls.py` the TLS contexts and their
reload; `deadlines.py` the one sweep that fires timeouts.

Part of the gateway front end: it drives the pipeline through the `Gateway` it is handed
(`apishield.gateway`, imported for types only) and may import `apishield.pipeline`,
`apishield.exchange`, `apishield.problems`, `apishield.config` and `apishield.contract.paths`.
It knows nothing of individual steps.
"""
