"""The DMP: CDA R2 documents sent to the patient's national shared medical record.

Sending to the DMP takes two calls to its web service, not one: before a document is rendered,
the engine asks whether the patient's DMP exists and is open (a closed or missing DMP will never
take the document, so there is no point building and sending it); then it sends the CDA. The
wire protocol is described in :mod:`.connector` and in docs/dmp.md.

- :mod:`.connector`: the ``dmp`` outbound connector (options, ``precheck``, ``deliver``);
- :mod:`.simulator`: a local DMP web service that keeps what it receives, for tests and demos;
- :mod:`.plugin`: the entry point registering the connector and ``simulate-dmp``.
"""
