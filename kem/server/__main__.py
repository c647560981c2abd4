"""``python -m kem.server serve ...``."""

from kem.server.cli import main

main()
