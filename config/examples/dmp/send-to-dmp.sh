#!/bin/sh
# Seed 001 with curl, step by step: Practitioner (the author, once), Patient, Binary,
# DocumentReference, CommunicationRequest to Device/dmp, then the Communication that records
# the outcome. Needs a running engine (`make run`) and DMP simulator
# (`medcourier simulate-dmp --port 6663 --out var/dmp`).
#   MEDCOURIER_API_TOKEN  the API token (make run keeps it in var/api-token)
#   MEDCOURIER_URL        the engine (default http://127.0.0.1:8080)
#   DOCUMENT              the PDF to send (default: config/examples/document.pdf)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
base=${MEDCOURIER_URL:-http://127.0.0.1:8080}
document=${DOCUMENT:-$here/../document.pdf}
auth="Authorization: Bearer ${MEDCOURIER_API_TOKEN:?set MEDCOURIER_API_TOKEN}"
json="Content-Type: application/fhir+json"

# post PATH [curl data arguments...]: POST, fail loudly on an error answer, print the new id
post() {
  path=$1; shift
  answer=$(curl -sS -H "$auth" -w '\n%{http_code}' -X POST "$base/fhir/$path" "$@")
  code=$(printf '%s' "$answer" | tail -n 1)
  body=$(printf '%s' "$answer" | sed '$d')
  case $code in 2*) ;; *) echo "POST $path answered $code: $body" >&2; exit 1 ;; esac
  printf '%s' "$body" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])'
}

practitioner=$(post Practitioner -H "$json" --data-binary @"$here/practitioner.json")
patient=$(post Patient -H "$json" --data-binary @"$here/patient.json")
# With return=minimal the answer has no body: read the id from the Location header instead.
binary=$(curl -sS -H "$auth" -H "Content-Type: application/pdf" -H "Prefer: return=minimal" \
  -D - -o /dev/null --data-binary @"$document" "$base/fhir/Binary" \
  | tr -d '\r' | sed -n 's#^[Ll]ocation: .*/Binary/##p')
test -n "$binary" || { echo "POST Binary gave no Location" >&2; exit 1; }
reference=$(post DocumentReference -H "$json" --data-binary @- <<JSON
{
  "resourceType": "DocumentReference",
  "status": "current",
  "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4",
                       "display": "Consult note"}]},
  "subject": {"reference": "Patient/$patient"},
  "author": [{"reference": "Practitioner/$practitioner"}],
  "indexed": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "description": "Compte rendu de consultation",
  "content": [{"attachment": {"contentType": "application/pdf", "url": "Binary/$binary"}}]
}
JSON
)
request=$(post CommunicationRequest -H "$json" --data-binary @- <<JSON
{
  "resourceType": "CommunicationRequest",
  "meta": {"tag": [{"system": "http://lifen.fr/fhir/tag/processing/mode",
                    "code": "IMMEDIATE_MODE",
                    "display": "request should be treated in immediate mode"}]},
  "status": "suspended",
  "priority": "routine",
  "extension": [{"url": "http://lifen.fr/fhir/StructureDefinition/communicationrequest-active-devices",
                 "valueReference": {"reference": "Device/dmp"}}],
  "category": [{"coding": [{"system": "http://lifen.fr/fhir/CodeSystem/communication-category",
                            "code": "MEDICAL_REPORT"}]}],
  "subject": {"reference": "Patient/$patient"},
  "payload": [{"contentReference": {"reference": "DocumentReference/$reference"}}],
  "sender": {"reference": "Practitioner/$practitioner"},
  "requester": {"agent": {"reference": "Organization/demo-hl7"}},
  "recipient": [{"reference": "Device/dmp"}]
}
JSON
)
echo "CommunicationRequest/$request"
# Wait for the outcome: completed, or entered-in-error with the reason.
for _ in $(seq 1 60); do
  status=$(curl -sS -H "$auth" "$base/fhir/Communication?based-on=CommunicationRequest/$request" \
    | python3 -c 'import json, sys
b = json.load(sys.stdin)
for e in b.get("entry", []):
    c = e["resource"]
    print(c["status"], c.get("notDoneReason", {}).get("text", ""))')
  case $status in
    completed*|entered-in-error*) echo "Communication: $status"; exit 0 ;;
  esac
  sleep 1
done
echo "no outcome after 60 s: $status" >&2
exit 1
