"""medcourier: a healthcare integration engine (FHIR, MLLP, files in; HL7 v2, HPRIM, CDA out)."""

__version__ = "0.1.0"
