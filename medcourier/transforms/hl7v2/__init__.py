"""HL7 v2 output formats.

Messages are written with plain string building rather than through an HL7 object model: a
delivery renders one message per document on the hot path, and the libraries that can parse and
validate HL7 (hl7apy, python-hl7) are kept for the tests, where they judge what we write.
"""
