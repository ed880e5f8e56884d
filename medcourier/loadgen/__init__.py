"""``medcourier bench``: a load generator for MLLP listeners and the FHIR ``$send-to-ehr`` API.

It points at anything that speaks the protocol (a running medcourier, another engine, a test
EHR) and reports messages per second, latency percentiles and errors by kind, as a table and as
JSON. The pieces:

- :mod:`~medcourier.loadgen.messages`: the ADT^A01 / ORU^R01 messages and the PDF sent;
- :mod:`~medcourier.loadgen.runner`: the schedule (closed loop or a fixed rate), the workers and
  what they record;
- :mod:`~medcourier.loadgen.mllp_load` and :mod:`~medcourier.loadgen.http_load`: one exchange
  for each protocol;
- :mod:`~medcourier.loadgen.report`: percentiles, the table and the JSON;
- :mod:`~medcourier.loadgen.progress`: the progress line on a terminal;
- :mod:`~medcourier.loadgen.plugin`: the command line, registered like any plugin's.
"""
