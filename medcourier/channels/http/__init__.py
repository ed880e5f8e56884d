"""HTTP out: renderings POSTed or PUT to a vendor's web API.

- :mod:`.outbound`: the ``http`` connector (options, status-code classification, TLS);
- :mod:`.receiver`: a small JSON API that stores what it gets, for tests and demos;
- :mod:`.plugin`: the entry point registering the connector and ``simulate-json``.
"""
