"""The `apishield` command line, one module per command group.

`main.py`: the parser and `serve`, `check`, `demo`; `keys.py`: `keys create | list |
revoke | rotate`; `bans.py`: `bans list | add | remove`; `config_option.py`: the
`--config` option they all share. The entry point is `apishield.cli.main:main`.

The top layer: it may import anything; nothing imports it.
"""
