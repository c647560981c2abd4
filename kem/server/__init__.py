"""kem's OpenAI-compatible HTTP server (``kem serve``), behind the ``server`` extra.

Three layers: :mod:`kem.server.protocol` (wire models), :mod:`kem.server.serving` (logic, no web
framework), :mod:`kem.server.app` (``build_app``, FastAPI); :mod:`kem.server.auth` maps API keys to
namespaces and :mod:`kem.server.serve_cli` holds the ``serve`` command. Nothing here is imported by ``kem``.
"""
