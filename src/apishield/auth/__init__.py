"""Authentication and authorization (checklist A1-A8).

Each `securityScheme` of the contract compiles to an authenticator (`schemes.py`); an
operation's `security` list is evaluated as OR of AND-sets (`requirements.py`); what
authenticates a caller is a `Principal`. Token verification lives in `jws.py` / `jwks.py` /
`introspection.py`, the API-key lifecycle in `apikeys.py` / `apikey_verifier.py`, with
the records in `apishield.state` (`keys.py`: the protocol, `sqlite.py`: the embedded store).
"""
