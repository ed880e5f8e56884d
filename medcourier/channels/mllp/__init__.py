"""MLLP: the Minimal Lower Layer Protocol that carries HL7 v2 over TCP.

Hospitals' EHRs and interface engines still take most HL7 v2 this way: each message is wrapped in
a ``<VT> ... <FS><CR>`` frame and answered with an ACK frame on the same connection. The package
is split so each piece can be reused and tested on its own:

- :mod:`.framing`: the byte-level frames (no HL7 knowledge), incremental and stream readers;
- :mod:`.ack`: reading and building HL7 v2 acknowledgements;
- :mod:`.client`: the outbound connector (one persistent connection per route);
- :mod:`.simulator`: a small EHR that ACKs everything, for tests and demos;
- :mod:`.plugin`: the entry point registering the connector and the ``simulate-ehr`` command.
"""
