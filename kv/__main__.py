"""`python -m kv` is kvctl, the command line (kv/cli.py)."""

from kv.cli import main

main()
