"""The contract layer: the OpenAPI document compiled once into what requests are checked
against.

`loader.py` reads the document ($refs across files, `x-apishield`) into `Operation`s;
`router.py` compiles the paths (static dict + segment trie); `paths.py` normalizes a request
target into one decoding or a refusal; `schema.py` turns OpenAPI schemas into compiled
JSON Schema validators; `shapes.py` keeps a schema's structure as a tree (filtering, typed
forms); `multipart.py` reads multipart/form-data framing.

May import: `apishield.config`, `apishield.exchange`, `apishield.problems`. Nothing here
knows of steps, the pipeline or HTTP transport.
"""
