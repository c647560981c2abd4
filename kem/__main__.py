"""``python -m kem`` is the ``kem`` command."""

from kem.cli import main

if __name__ == "__main__":
    main()
