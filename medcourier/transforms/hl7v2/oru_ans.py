"""The ``hl7v2-ans-cda`` format: the ANS profile "Transmission de documents CDA en HL7v2".

The CI-SIS guide (ANS, IG ``ansforge/IG-hl7v2-volet-transmission-document-cda-r2``, volet 2.1)
tells a document producer (the *CREATEUR*) how to hand a CDA R2 document to the platform that
publishes it in the DMP and mails it over MSSanté (the *GESTIONNAIRE*, or PFI). Section names
below are those of the guide's Volume 2 ("Détail des transactions"); the segment-by-segment
rules are under "Contraintes appliquées aux messages MDM et ORU dans le contexte de ce volet".

The message is built like the spine's ``hl7v2-oru`` (plain string formatting, validated in the
tests by hl7apy) and reuses its helpers: :func:`~medcourier.transforms.hl7v2.escape.escape`,
the PID/PV1 builders and the timestamp formatting. The CDA itself is rendered by
:func:`medcourier.transforms.cda.dmp.render_cda`, so the document, its INS identity and its XDS
metadata are exactly those of the ``cda-dmp`` format.

Shape of an ORU^R01 (v2.5, "Message ORU^R01^ORU_R01 en HL7v2.5")::

    MSH   ...|ORU^R01^ORU_R01|id|P|2.5|||||FRA|UNICODE UTF-8|||2.1^CISIS_CDA_HL7_V2
    PID   INS and IPP in PID-3, exactly the ids of the CDA recordTarget
    PV1   the visit (PV1-19 required for E, I, O and R patient classes)
    ORC   NW / RO / CA: new document, replacement, deletion
    OBR   OBR-4 = the document type (JDV_J07), identical to OBX-3
    OBX   ED ^TEXT^XML^Base64^<the CDA>, OBX-11 F / C / D matching ORC-1
    PRT   SB: who asks (RPPS) and for which organization, then RCT recipients, REPLY address
    OBX   the MetaDMPMSS metadata, Y or N, in the guide's order (then optional mail bodies)

MDM (v2.6, "Message MDM en HL7v2.6") adds EVN and TXA, and names the action by its trigger
event (T02 new, T10 replacement, T04 deletion).

PRT is not a v2.5 (nor v2.6) segment: the guide pre-adopts it from v2.9 ("Choix des
standards", note 1). A v2.5 receiver that does not know PRT skips it as it would any unexpected
segment; the tests therefore validate the message structure without the PRT segments and each
PRT on its own against the v2.8.2 definition.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from medcourier.engine.errors import RenderError
from medcourier.engine.model import Base64Part, Document, Issue, Rendered
from medcourier.engine.plugins import FormatType, hookimpl
from medcourier.transforms.cda.dmp import (
    RPPS_PREFIX,
    RPPS_ROOT,
    STRUCTURE_ROOT,
    CdaDmpOptions,
    PatientIdentity,
    Replacement,
    patient_identity,
    render_cda,
)
from medcourier.transforms.cda.dmp import validate as validate_cda
from medcourier.transforms.cda.xds import XdsMetadata, xds_metadata
from medcourier.transforms.fhir_json import as_dict, as_dicts, as_str
from medcourier.transforms.hl7v2.escape import escape
from medcourier.transforms.hl7v2.oru import (
    MEDIA_TYPE,
    STREAM_ABOVE,
    OruOptions,
    control_id_problem,
    hl7_timestamp,
    pid_segment,
    pv1_segment,
)
from medcourier.transforms.payload import splice_base64

FORMAT_NAME = "hl7v2-ans-cda"

# MSH-21 ("Le segment MSH"): the profile identifier, EI entity identifier + namespace.
PROFILE_ID = "2.1^CISIS_CDA_HL7_V2"
COUNTRY = "FRA"  # MSH-17
CHARSET = "UNICODE UTF-8"  # MSH-18: "UNICODE UTF-8 ou 8859/15"; we always write UTF-8

# "Le segment MSH", MSH-12: 2.5 for ORU, 2.6 for MDM.
GUIDE_VERSION: dict[str, str] = {"ORU": "2.5", "MDM": "2.6"}

Action = Literal["new", "replace", "delete"]

# "Le segment ORC" and "Evènements déclenchants": the action on the document is said three
# times and the three must agree, or the PFI rejects the message.
ORDER_CONTROL: dict[str, str] = {"new": "NW", "replace": "RO", "delete": "CA"}  # ORC-1
RESULT_STATUS: dict[str, str] = {"new": "F", "replace": "C", "delete": "D"}  # OBX-11, table 0085
MDM_EVENT: dict[str, str] = {"new": "T02", "replace": "T10", "delete": "T04"}  # MSH-9.2

# Coding system of the OBX-3 codes ("Les métadonnées DMP/MSSanté", table MetaDMP/MSS) and of
# their Y/N values (OBX-5.3, HL7 table 0136).
META_SYSTEM = "MetaDMPMSS"
YES_NO_SYSTEM = "expandedYes-NoIndicator"

# The MetaDMP/MSS table (page "meta-dmp-mss"), in the order the guide requires the OBX to appear
# ("Les métadonnées doivent apparaître dans le message HL7 dans l'ordre indiqué ci-dessous").
MASQUE_PS = "MASQUE_PS"
INVISIBLE_PATIENT = "INVISIBLE_PATIENT"
INVISIBLE_REP_LEGAUX = "INVISIBLE_REP_LEGAUX"
CONNEXION_SECRETE = "CONNEXION_SECRETE"
MODIF_CONF_CODE = "MODIF_CONF_CODE"
DESTDMP = "DESTDMP"
DESTMSSANTEPS = "DESTMSSANTEPS"
DESTMSSANTEPAT = "DESTMSSANTEPAT"
ACK_RECEPTION = "ACK_RECEPTION"
ACK_LECTURE_MSS = "ACK_LECTURE_MSS"
CORPSMAIL_PS = "CORPSMAIL_PS"
CORPSMAIL_PATIENT = "CORPSMAIL_PATIENT"

META_LABELS: dict[str, str] = {
    MASQUE_PS: "Masqué aux professionnels de Santé",
    INVISIBLE_PATIENT: "Document Non Visible par le patient",
    INVISIBLE_REP_LEGAUX: "Non visible par les représentants Légaux du patient",
    CONNEXION_SECRETE: "Connexion Secrete",
    MODIF_CONF_CODE: "Modification Confidentiality Code",
    DESTDMP: "Destinataire DMP",
    DESTMSSANTEPS: "Destinataire (Professionnel de Santé, organisation ou BAL applicative)",
    DESTMSSANTEPAT: "Destinataire Patient",
    ACK_RECEPTION: "Accusé de réception",
    ACK_LECTURE_MSS: "Accusé de lecture",
    CORPSMAIL_PS: "Corps du mail pour un PS",
    CORPSMAIL_PATIENT: "Corps du mail pour le patient",
}
META_ORDER: tuple[str, ...] = tuple(META_LABELS)

# PRT-4 participations ("Les données concernant la demande de traitement sur le(s) document(s)").
PARTICIPATION_SENDER = "SB^Send by^participation"
PARTICIPATION_RECIPIENT = "RCT^Result Copies To^participation"
PARTICIPATION_REPLY = "REPLY^Reply To^participation"
PRT_ACTION = "UC"  # PRT-2: unchanged
EMAIL_EQUIPMENT = "X.400"  # PRT-15.3 for an MSSanté address

# Assigning authorities (HD namespace&OID&ISO). The namespaces are those of the ANS examples;
# the OIDs are the national ones (persons 1.2.250.1.71.4.2.1, structures 1.2.250.1.71.4.2.2).
PS_AUTHORITY = f"ASIP-SANTE-PS&{RPPS_ROOT}&ISO"
STRUCTURE_NAMESPACE = "ASIP-SANTE-ST"
INS_NAMESPACES: dict[str, str] = {
    "1.2.250.1.213.1.4.8": "ASIP-SANTE-INS-NIR",
    "1.2.250.1.213.1.4.9": "ASIP-SANTE-INS-NIA",
    "1.2.250.1.213.1.4.10": "ASIP-SANTE-INS-NIR",  # test NIR, named as in the ANS examples
    "1.2.250.1.213.1.4.11": "ASIP-SANTE-INS-NIA",
}

# The patient's MSSanté mailbox ("messagerie citoyenne" of Mon espace santé) is named after the
# INS: 15-character matricule @ this domain, as in the guide's examples.
PATIENT_MSSANTE_DOMAIN = "patient.mssante.fr"

# FR Core identity reliability (HL7 table 0445 as PAM.fr uses it, in PID-32).
IDENTITY_RELIABILITY_URL = (
    "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability"
)
IDENTITY_QUALIFIED = "VALI"

# PV1-2 classes for which PV1-19 (the visit number) is required ("Les données concernant le
# patient et la venue du patient", note 2).
_VISIT_NUMBER_REQUIRED = frozenset("EIOR")

_RPPS = re.compile(r"\d{11}")
_EMAIL = re.compile(r"[^\s@|^~\\&]+@[^\s@|^~\\&]+\.[^\s@|^~\\&]+")


def _rpps(value: str) -> str:
    if not _RPPS.fullmatch(value):
        raise ValueError(f"{value!r} is not an 11-digit RPPS number")
    return value


def _email(value: str) -> str:
    if not _EMAIL.fullmatch(value):
        raise ValueError(f"{value!r} is not an e-mail address (MSSanté mailbox)")
    return value


class PersonName(BaseModel):
    """A professional's name as it appears in PRT-5.2 / 5.3 (nom et prénom d'exercice)."""

    model_config = ConfigDict(extra="forbid")

    family: str = Field(min_length=1)
    given: str = ""


class Recipient(PersonName):
    """A health professional the PFI mails the document to over MSSanté (a PRT RCT).

    ``mssante`` is the professional's MSSanté mailbox: the RCT segment "contient l'adresse
    MSSanté d'un destinataire" (PRT-15.4), chosen by the producer from the health directory.
    """

    rpps: str
    mssante: str

    @field_validator("rpps")
    @classmethod
    def _rpps_shape(cls, value: str) -> str:
        return _rpps(value)

    @field_validator("mssante")
    @classmethod
    def _mssante_shape(cls, value: str) -> str:
        return _email(value)


class Visibility(BaseModel):
    """Who may see the document in the DMP (MetaDMP/MSS MASQUE_PS, INVISIBLE_PATIENT,
    INVISIBLE_REP_LEGAUX). Everything is visible by default, as in the guide's examples; a
    ``false`` here writes ``Y`` in the matching OBX."""

    model_config = ConfigDict(extra="forbid")

    professionals: bool = Field(
        default=True, description="false: MASQUE_PS=Y, the document is hidden from professionals"
    )
    patient: bool = Field(
        default=True, description="false: INVISIBLE_PATIENT=Y, the patient cannot see it"
    )
    legal_representatives: bool = Field(
        default=True,
        description="false: INVISIBLE_REP_LEGAUX=Y, the patient's legal representatives cannot",
    )


class AnsCdaOptions(BaseModel):
    """A route's ``format_options`` for ``hl7v2-ans-cda``.

    ``message_type`` picks ORU^R01 (the default) or MDM; for MDM the trigger event must be the
    one the guide gives for ``action`` (T02 new, T10 replace, T04 delete). ``version`` defaults
    to the guide's (2.5 for ORU, 2.6 for MDM) and accepts no other value. ``cda`` holds the
    options of the embedded CDA, those of the ``cda-dmp`` format.
    """

    model_config = ConfigDict(extra="forbid")

    message_type: Literal["ORU^R01", "MDM^T02", "MDM^T10", "MDM^T04"] = "ORU^R01"
    version: Literal["2.5", "2.6"] | None = Field(
        default=None, description="MSH-12; default and only accepted value: 2.5 ORU, 2.6 MDM"
    )
    sending_application: str = Field(default="MEDCOURIER", min_length=1)
    sending_facility: str = Field(default="MEDCOURIER", min_length=1)
    receiving_application: str = Field(min_length=1, description="MSH-5, required by the guide")
    receiving_facility: str = Field(min_length=1, description="MSH-6, required by the guide")
    processing_id: Literal["P", "T", "D"] = "P"
    action: Action = Field(
        default="new",
        description="new (ORC-1 NW, OBX-11 F), replace (RO, C) or delete (CA, D)",
    )
    cda: CdaDmpOptions

    dmp: bool = Field(default=True, description="DESTDMP: publish the document in the DMP")
    visibility: Visibility = Field(default_factory=Visibility)
    secret_connection: bool = Field(
        default=False, description="CONNEXION_SECRETE: use the DMP 'connexion secrète' mode"
    )
    confidentiality_change: bool = Field(
        default=False,
        description="MODIF_CONF_CODE: this transaction changes the masking/visibility metadata",
    )
    recipients: list[Recipient] = Field(
        default_factory=list,
        description="professionals mailed over MSSanté (PRT RCT); any makes DESTMSSANTEPS=Y",
    )
    mssante_patient: bool = Field(
        default=False,
        description="DESTMSSANTEPAT: mail the document to the patient's MSSanté mailbox",
    )
    patient_may_reply: bool = Field(
        default=True, description="false: NTE 'FIN' after DESTMSSANTEPAT, the patient cannot reply"
    )
    reply_to: str | None = Field(
        default=None, description="PRT REPLY: the address recipients may answer to"
    )
    acknowledge_reception: bool = Field(
        default=False, description="ACK_RECEPTION: ask for DMP/MSSanté reception acks (ZAM)"
    )
    acknowledge_reading: bool = Field(
        default=False, description="ACK_LECTURE_MSS: ask for MSSanté read acks (ZAM)"
    )
    mail_body_professionals: str | None = Field(
        default=None, min_length=1, description="CORPSMAIL_PS: text of the mail to professionals"
    )
    mail_body_patient: str | None = Field(
        default=None, min_length=1, description="CORPSMAIL_PATIENT: text of the mail to the patient"
    )
    sender_names: dict[str, PersonName] = Field(
        default_factory=dict,
        description="nom et prénom d'exercice by RPPS, for PRT SB (the Document carries the RPPS "
        "only); the PFI puts them in the DMP authentication token",
    )
    sender_organization_id_type: Literal["FINEG", "FINEJ", "IDNST"] = Field(
        default="FINEG",
        description="PRT-8.7 of the SB segment (Interop'Santé table 0203); PRT-8.10 carries the "
        "organization's national identifier as in the CDA",
    )

    @field_validator(
        "sending_application", "sending_facility", "receiving_application", "receiving_facility"
    )
    @classmethod
    def _hd_like_the_spine(cls, value: str, info: ValidationInfo) -> str:
        """MSH-3..6 follow the rules of the spine's ORU (components only, no other delimiter)."""
        try:
            OruOptions.model_validate({info.field_name: value})
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return value

    @field_validator("reply_to")
    @classmethod
    def _reply_to_shape(cls, value: str | None) -> str | None:
        return None if value is None else _email(value)

    @field_validator("sender_names")
    @classmethod
    def _sender_keys_are_rpps(cls, value: dict[str, PersonName]) -> dict[str, PersonName]:
        for rpps in value:
            _rpps(rpps)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AnsCdaOptions:
        """Cross-field rules of the guide, checked when the configuration is loaded."""
        family, _, event = self.message_type.partition("^")
        if family == "MDM" and event != MDM_EVENT[self.action]:
            # "Le segment ORC": ORC-1 must agree with the MDM trigger event.
            raise ValueError(
                f"message_type {self.message_type} does not match action {self.action!r}: the "
                f"guide uses MDM^{MDM_EVENT[self.action]} for it"
            )
        if self.version is not None and self.version != GUIDE_VERSION[family]:
            raise ValueError(
                f"version {self.version} is not the guide's for {family} "
                f"(MSH-12: {GUIDE_VERSION[family]})"
            )
        if self.mssante_patient and not self.visibility.patient:
            # Point d'attention of "Document Non visible par le patient".
            raise ValueError(
                "a document hidden from the patient must not be mailed to the patient "
                "(mssante_patient with visibility.patient false)"
            )
        if not (self.dmp or self.recipients or self.mssante_patient):
            raise ValueError(
                "the message would ask for nothing: enable dmp, list recipients or set "
                "mssante_patient"
            )
        if self.mail_body_professionals is not None and not self.recipients:
            raise ValueError("mail_body_professionals is set but there are no recipients")
        if self.mail_body_patient is not None and not self.mssante_patient:
            raise ValueError("mail_body_patient is set but mssante_patient is false")
        if self.sender_organization_id_type != "IDNST":
            org = self.cda.author_org
            if org.id_root != STRUCTURE_ROOT or not org.id_extension.startswith("1"):
                raise ValueError(
                    f"sender_organization_id_type {self.sender_organization_id_type} names a "
                    "FINESS, but the author organization is not identified by '1' + FINESS; "
                    "use IDNST"
                )
        return self

    @property
    def family(self) -> Literal["ORU", "MDM"]:
        """ORU or MDM."""
        return "MDM" if self.message_type.startswith("MDM") else "ORU"

    @property
    def hl7_version(self) -> str:
        """MSH-12: the configured version, or the guide's for the message family."""
        return self.version or GUIDE_VERSION[self.family]


@hookimpl
def medcourier_formats() -> list[FormatType]:
    """Register ``hl7v2-ans-cda``."""
    return [
        FormatType(
            name=FORMAT_NAME,
            options_model=AnsCdaOptions,
            render=render,
            validate=validate,
            description="ANS 'Transmission de documents CDA en HL7v2' (CI-SIS): ORU^R01 v2.5 or "
            "MDM v2.6 carrying the DMP CDA R2 in OBX-5, with PRT and MetaDMPMSS metadata",
        )
    ]


# --- validate --------------------------------------------------------------------------------


def validate(
    document: Document,
    options: AnsCdaOptions,
    *,
    action: Action | None = None,
    replaces: str | Replacement | None = None,
) -> list[Issue]:
    """Everything the CDA module finds (INS and its traits, RPPS, J07 type, media type...), then
    what this profile adds. :func:`render_message` refuses every error reported here."""
    return validate_cda(document, options.cda) + _profile_issues(
        document, options, action or options.action, replaces
    )


def _profile_issues(
    document: Document,
    options: AnsCdaOptions,
    action: Action,
    replaces: str | Replacement | None,
) -> list[Issue]:
    """The checks this profile adds to the CDA module's."""
    issues: list[Issue] = []
    problem = control_id_problem(document.transaction_id)
    if problem:
        issues.append(Issue(problem, location="transaction_id"))
    if action == "replace" and replaces is None:
        issues.append(Issue(_NO_REPLACED_DOCUMENT, location="action"))

    identity = patient_identity(document.patient)
    if identity.ins is not None:
        status = identity_reliability(document.patient)
        if status is not None and status != IDENTITY_QUALIFIED:
            # "Choix des standards": only a qualified INS may be sent.
            issues.append(
                Issue(
                    f"the patient's identity is {status}, not qualified ({IDENTITY_QUALIFIED}): "
                    "its INS cannot be transmitted",
                    location="Patient.extension:identityReliability",
                )
            )

    pv1 = pv1_segment(document.encounter).split("|")
    patient_class = pv1[2] if len(pv1) > 2 else ""
    if patient_class in _VISIT_NUMBER_REQUIRED and (len(pv1) <= 19 or not pv1[19]):
        # "Les données concernant le patient et la venue du patient", note 2.
        issues.append(
            Issue(
                f"the visit number (PV1-19) is required for patient class {patient_class}: the "
                "Encounter needs an identifier",
                location="Encounter.identifier",
            )
        )

    rpps = document.sender_identifier
    if rpps is not None and _RPPS.fullmatch(rpps) and rpps not in options.sender_names:
        issues.append(
            Issue(
                f"no name configured for sender {rpps} (sender_names): PRT-5.2/5.3 are left "
                "empty and the PFI has to find the name in the health directory",
                severity="warning",
                location="sender_identifier",
            )
        )
    if options.dmp and options.cda.confidentiality in ("R", "V"):
        # Point d'attention of "Alimentation DMP".
        issues.append(
            Issue(
                f"confidentiality {options.cda.confidentiality}: the guide advises against "
                "sharing a restricted document in the DMP",
                severity="warning",
                location="format_options.cda.confidentiality",
            )
        )
    return issues


_NO_REPLACED_DOCUMENT = (
    "action 'replace' needs the id of the version it replaces (relatedDocument RPLC, TXA-13); "
    "render it with render_message(..., replaces=...)"
)


def identity_reliability(patient: Mapping[str, Any]) -> str | None:
    """The identity status of FR Core's identity-reliability extension (VALI, PROV...), if any."""
    for extension in as_dicts(patient.get("extension")):
        if extension.get("url") != IDENTITY_RELIABILITY_URL:
            continue
        for inner in as_dicts(extension.get("extension")):
            if inner.get("url") == "identityStatus":
                return as_str(as_dict(inner.get("valueCoding")).get("code")).strip() or None
    return None


# --- render ----------------------------------------------------------------------------------


def render(document: Document, options: AnsCdaOptions) -> Rendered:
    """Render ``document`` with the route's action (see :func:`render_message`)."""
    return render_message(document, options)


def render_message(
    document: Document,
    options: AnsCdaOptions,
    *,
    action: Action | None = None,
    replaces: str | Replacement | None = None,
) -> Rendered:
    """Render the whole message, UTF-8 encoded.

    ``action`` overrides the route's; ``replaces`` names the version a replacement replaces (a
    transaction id or a :class:`~medcourier.transforms.cda.dmp.Replacement`), as the CDA's
    relatedDocument and, in MDM, TXA-13. For MDM the trigger event follows the action.

    :raises RenderError: any error :func:`validate` reports: the CDA cannot be rendered (INS,
        RPPS, type...), MSH-10 would be invalid, a replacement does not say what it replaces,
        the identity is not qualified, or PV1-19 is missing where the guide requires it.
    """
    chosen: Action = action or options.action
    errors = [
        issue.message
        for issue in _profile_issues(document, options, chosen, replaces)
        if issue.severity == "error"
    ]
    if errors:
        raise RenderError("; ".join(errors))
    control_id = document.transaction_id
    replacement = Replacement(document_id=replaces) if isinstance(replaces, str) else replaces
    if chosen != "replace":
        replacement = None

    cda = render_cda(document, options.cda, replacement)
    metadata = xds_metadata(document, options.cda)
    identity = patient_identity(document.patient)
    created = hl7_timestamp(document.created_at)
    mdm = options.family == "MDM"

    doc_type = f"{escape(metadata.type_code.code)}^{escape(metadata.type_code.display)}^LN"
    head: list[str] = [_msh(options, chosen, control_id, created)]
    if mdm:
        head.append(f"EVN||{created}")  # EVN-2 recorded date/time
    head.append(_pid_ans(document.patient, identity))
    head.append(pv1_segment(document.encounter))
    # "Le segment ORC" / "Le segment OBR": only ORC-1 and OBR-4 are constrained; OBR-4 is the
    # document type and equals OBX-3.
    head.append(f"ORC|{ORDER_CONTROL[chosen]}")
    head.append(f"OBR|1|||{doc_type}")
    if mdm:
        head.append(_txa(document, options, metadata, replacement))
    # OBX-5.2 is TEXT in ORU and "text" in MDM ("Les données concernant la demande de
    # traitement sur le(s) document(s)").
    text_type = "text" if mdm else "TEXT"
    head.append(f"OBX|1|ED|{doc_type}||^{text_type}^XML^Base64^")
    tail = [f"||||||{RESULT_STATUS[chosen]}"]
    tail.extend(_participations(document, options, identity))
    tail.extend(_metadata_segments(options, coded_type="CWE" if mdm else "CE", text_type=text_type))

    head_bytes, tail_bytes = "\r".join(head).encode(), ("\r".join(tail) + "\r").encode()
    if len(cda) > STREAM_ABOVE:
        # A large CDA (it carries the PDF) stays as it is, its Base64 made slice by slice while
        # the message is sent, as the ORU format does: the rendering then holds the CDA alone,
        # not the CDA and a Base64 copy of it a third larger.
        return Rendered.from_parts(
            (head_bytes, Base64Part(cda), tail_bytes), MEDIA_TYPE, f"{control_id}.hl7", control_id
        )
    # The CDA is Base64-encoded slice by slice straight into the output, as the CDA module does
    # for its own body, so the Base64 is never held apart from the message.
    return Rendered(
        data=splice_base64(head_bytes, cda, tail_bytes),
        media_type=MEDIA_TYPE,
        filename_hint=f"{control_id}.hl7",
        message_id=control_id,
    )


# --- segments -------------------------------------------------------------------------------


def _msh(options: AnsCdaOptions, action: Action, control_id: str, created: str) -> str:
    """MSH per "Le segment MSH": MSH-9 with the message structure, MSH-17 FRA, MSH-18 the
    character set, MSH-21 the profile identifier."""
    if options.family == "MDM":
        message_type = f"MDM^{MDM_EVENT[action]}^MDM_T02"
    else:
        message_type = "ORU^R01^ORU_R01"
    fields = [
        "MSH",
        "^~\\&",
        options.sending_application,
        options.sending_facility,
        options.receiving_application,
        options.receiving_facility,
        created,
        "",
        message_type,
        control_id,
        options.processing_id,
        options.hl7_version,
        "",
        "",
        "",
        "",
        COUNTRY,
        CHARSET,
        "",
        "",
        PROFILE_ID,
    ]
    return "|".join(fields)


def _pid_ans(patient: Mapping[str, Any], identity: PatientIdentity) -> str:
    """The spine's PID, with the identity the INS requires ("Les données concernant le patient
    et la venue du patient", which defers to PAM.fr and the CI-SIS INS annex):

    - PID-3: the INS (``NIR^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS``), then the local
      identifiers (IPP, type PI): exactly the ids of the CDA recordTarget, as the guide requires;
    - PID-5: the birth name (type L: birth name, first given name, list of given names), then
      the used name (type D) when the patient has one;
    - PID-11: a BDL (birth delivery location) repetition with the INSEE code in XAD-9;
    - PID-32: the identity reliability code, VALI for a qualified identity.
    """
    fields = pid_segment(patient).split("|")
    fields += [""] * (33 - len(fields))
    fields[3] = "~".join(_patient_cx(patient, identity))
    fields[5] = "~".join(_patient_names(identity))
    if identity.birth_place_code:
        city = escape(identity.birth_place_city or "")
        birth_place = f"^^{city}^^^^BDL^^{escape(identity.birth_place_code)}"
        fields[11] = f"{fields[11]}~{birth_place}" if fields[11] else birth_place
    if identity.ins is not None:
        fields[32] = identity_reliability(patient) or IDENTITY_QUALIFIED
    return "|".join(fields).rstrip("|")


def _patient_cx(patient: Mapping[str, Any], identity: PatientIdentity) -> list[str]:
    found: list[str] = []
    if identity.ins is not None:
        oid, value = identity.ins
        found.append(f"{escape(value)}^^^{INS_NAMESPACES[oid]}&{oid}&ISO^INS")
    assigners = {
        as_str(identifier.get("system")): as_str(as_dict(identifier.get("assigner")).get("display"))
        for identifier in as_dicts(patient.get("identifier"))
    }
    for oid, value in identity.local_ids:
        namespace = escape(assigners.get(f"urn:oid:{oid}", ""))
        found.append(f"{escape(value)}^^^{namespace}&{oid}&ISO^PI")
    return found


def _patient_names(identity: PatientIdentity) -> list[str]:
    names: list[str] = []
    if identity.birth_family:
        names.append(
            f"{escape(identity.birth_family)}^{escape(identity.first_given or '')}"
            f"^{escape(identity.given_list or '')}^^^^L"
        )
    if identity.used_family or identity.used_given:
        names.append(
            f"{escape(identity.used_family or '')}^{escape(identity.used_given or '')}^^^^^D"
        )
    return names


def _txa(
    document: Document,
    options: AnsCdaOptions,
    metadata: XdsMetadata,
    replacement: Replacement | None,
) -> str:
    """TXA per "Les métadonnées du document [Uniquement pour le message MDM]": TXA-2 the J07
    type, TXA-3 TEXT, TXA-12 the CDA id (``extension^^root^ISO``), TXA-13 the replaced
    document's id for a replacement, TXA-17 AU (authenticated)."""
    root = options.cda.document_id_root
    fields = [""] * 18
    fields[0] = "TXA"
    fields[1] = "1"
    fields[2] = escape(metadata.type_code.code)
    fields[3] = "TEXT"
    fields[12] = f"{escape(document.transaction_id)}^^{root}^ISO"
    if replacement is not None:
        parent_root = replacement.root or root
        fields[13] = f"{escape(replacement.document_id)}^^{parent_root}^ISO"
    fields[17] = "AU"
    return "|".join(fields)


def _participations(
    document: Document, options: AnsCdaOptions, identity: PatientIdentity
) -> list[str]:
    """The PRT segments after the document OBX, in the guide's order: the sender (SB), the
    recipients (RCT: professionals, then the patient), the reply address (REPLY)."""
    segments = [_prt_sender(document, options)]
    for recipient in options.recipients:
        person = _xcn(
            RPPS_PREFIX + recipient.rpps, recipient.family, recipient.given, PS_AUTHORITY, "D"
        )
        segments.append(_prt(PARTICIPATION_RECIPIENT, person=person, email=recipient.mssante))
    if options.mssante_patient and identity.ins is not None:
        oid, ins = identity.ins
        person = _xcn(
            ins,
            identity.birth_family or "",
            identity.first_given or "",
            f"{INS_NAMESPACES[oid]}&{oid}&ISO",
            "L",
            id_type="INS",
        )
        email = f"{ins}@{PATIENT_MSSANTE_DOMAIN}"
        segments.append(_prt(PARTICIPATION_RECIPIENT, person=person, email=email))
    if options.reply_to is not None:
        segments.append(_prt(PARTICIPATION_REPLY, email=options.reply_to))
    return segments


def _prt_sender(document: Document, options: AnsCdaOptions) -> str:
    """PRT SB: the professional who asks (PRT-5, ``"8" + RPPS`` under the national person OID,
    type RPPS, as in the guide's examples) and the organization (PRT-8, its national identifier
    under 1.2.250.1.71.4.2.2). The PFI builds the DMP authentication token (VIHF) from it."""
    rpps = document.sender_identifier or ""
    name = options.sender_names.get(rpps)
    person = _xcn(
        RPPS_PREFIX + rpps,
        name.family if name else "",
        name.given if name else "",
        PS_AUTHORITY,
        "D",
    )
    org = options.cda.author_org
    namespace = STRUCTURE_NAMESPACE if org.id_root == STRUCTURE_ROOT else ""
    organization = (
        f"{escape(org.name)}^^^^^{namespace}&{org.id_root}&ISO"
        f"^{options.sender_organization_id_type}^^^{escape(org.id_extension)}"
    )
    return _prt(PARTICIPATION_SENDER, person=person, organization=organization)


def _xcn(
    identifier: str,
    family: str,
    given: str,
    authority: str,
    name_type: str,
    id_type: str = "RPPS",
) -> str:
    """XCN ``id^family^given^^^^^^authority^name type^^^id type`` (components 1-3, 9, 10, 13)."""
    return (
        f"{escape(identifier)}^{escape(family)}^{escape(given)}^^^^^^{authority}"
        f"^{name_type}^^^{id_type}"
    )


def _prt(participation: str, *, person: str = "", organization: str = "", email: str = "") -> str:
    """A PRT (v2.9 layout): PRT-2 action, PRT-4 participation, PRT-5 person, PRT-8
    organization, PRT-15 telecom (``^^X.400^address``)."""
    fields = [""] * 16
    fields[0] = "PRT"
    fields[2] = PRT_ACTION
    fields[4] = participation
    fields[5] = person
    fields[8] = organization
    if email:
        fields[15] = f"^^{EMAIL_EQUIPMENT}^{escape(email)}"
    return "|".join(fields).rstrip("|")


@dataclass(frozen=True)
class MetaValue:
    """One MetaDMP/MSS observation: a Y/N flag, or a mail body (``text``)."""

    code: str
    flag: bool | None = None
    text: str | None = None


def metadata_values(options: AnsCdaOptions) -> list[MetaValue]:
    """The MetaDMP/MSS observations for ``options``, in the guide's order.

    The ten flags are always written (Y or N, "valorisées avec Y ou N suivant qu'elles sont
    activées ou non"); the two mail bodies only when configured (optional, [0..1]).
    """
    values = [
        MetaValue(MASQUE_PS, not options.visibility.professionals),
        MetaValue(INVISIBLE_PATIENT, not options.visibility.patient),
        MetaValue(INVISIBLE_REP_LEGAUX, not options.visibility.legal_representatives),
        MetaValue(CONNEXION_SECRETE, options.secret_connection),
        MetaValue(MODIF_CONF_CODE, options.confidentiality_change),
        MetaValue(DESTDMP, options.dmp),
        MetaValue(DESTMSSANTEPS, bool(options.recipients)),
        MetaValue(DESTMSSANTEPAT, options.mssante_patient),
        MetaValue(ACK_RECEPTION, options.acknowledge_reception),
        MetaValue(ACK_LECTURE_MSS, options.acknowledge_reading),
    ]
    if options.mail_body_professionals is not None:
        values.append(MetaValue(CORPSMAIL_PS, text=options.mail_body_professionals))
    if options.mail_body_patient is not None:
        values.append(MetaValue(CORPSMAIL_PATIENT, text=options.mail_body_patient))
    return values


def _metadata_segments(options: AnsCdaOptions, *, coded_type: str, text_type: str) -> list[str]:
    """The MetaDMPMSS OBX ("Les métadonnées DMP/MSSanté"), numbered after the document's.

    Flags: OBX-2 CE (ORU) or CWE (MDM), OBX-5 ``Y^^expandedYes-NoIndicator``; mail bodies: OBX-2
    ED, OBX-5 the UTF-8 text in Base64 (``^TEXT^^Base64^...``, as the guide's examples); OBX-11
    is always F. An NTE ``FIN`` follows DESTMSSANTEPAT when the patient may not reply.
    """
    segments: list[str] = []
    for set_id, value in enumerate(metadata_values(options), start=2):
        observation = f"{value.code}^{escape(META_LABELS[value.code])}^{META_SYSTEM}"
        if value.text is not None:
            encoded = binascii.b2a_base64(value.text.encode(), newline=False).decode("ascii")
            segments.append(f"OBX|{set_id}|ED|{observation}||^{text_type}^^Base64^{encoded}||||||F")
            continue
        flag = "Y" if value.flag else "N"
        segments.append(f"OBX|{set_id}|{coded_type}|{observation}||{flag}^^{YES_NO_SYSTEM}||||||F")
        if value.code == DESTMSSANTEPAT and value.flag and not options.patient_may_reply:
            segments.append("NTE|1|||FIN")
    return segments
