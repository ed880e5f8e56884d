"""The FHIR HTTP API: directory, $send-to-ehr and $tracking."""
