"""``python -m kem.server serve ...``.

Guarded: vLLM's in-process engine spawns processes that re-import the main module.
"""

from kem.server.serve_cli import main

if __name__ == "__main__":
    main()
