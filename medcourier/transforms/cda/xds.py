"""The XDS / DMP metadata of a document, derived in one place.

A document shared in the DMP is described twice: in its CDA header, and in the XDS metadata of
the submission (in the HL7 v2 "CDA in ORU" profile of the ANS, the ``MetaDMPMSS`` OBX segments).
The two must agree, so both are computed here from the same inputs: the LOINC type of the
:class:`~medcourier.engine.model.Document`, its media type and the route's options.

Every table below is a subset or a copy of a CI-SIS value set, named where it is used:

- ``typeCode``: JDV_J07-XdsTypeCode-CISIS (OID 1.2.250.1.213.1.1.5.471), LOINC codes
  (code system 2.16.840.1.113883.6.1) with the value set's French display names. The StrucMin
  schematron checks ``ClinicalDocument/code/@code`` against this value set, so a code outside it
  is refused unless a route explicitly allows it (for receivers other than the DMP).
- ``classCode``: derived from the typeCode by the association ASS_X04-CorrespondanceType-Classe-
  CISIS, into TRE_A03-ClasseDocument (OID 1.2.250.1.213.1.1.4.1; value sets JDV_J06-XdsClassCode-
  CISIS and JDV_J57-ClassCode-DMP). Note: JDV_J01 is *XdsAuthorSpecialty* (the author's role),
  not the class code.
- ``formatCode``: derived from the body's media type by ASS_A12-CorresMediaTypeCDANonStructure-
  XdsFormatCode-CISIS, into TRE_A11-IheFormatCode (OID 1.3.6.1.4.1.19376.1.2.3; value set
  JDV_J10-XdsFormatCode-CISIS). Only PDF, plain text, RTF, JPEG and TIFF have one: a PNG must be
  converted before it can be shared (see :func:`body_media_type`).
- ``healthcareFacilityTypeCode``: JDV_J02-XdsHealthcareFacilityTypeCode-CISIS (OID
  1.2.250.1.213.1.1.5.466), codes of TRE_R02-SecteurActivite (1.2.250.1.71.4.2.4) and
  TRE_A00-ProducteurDocNonPS (1.2.250.1.213.1.1.4.6).
- ``practiceSettingCode``: JDV_J04-XdsPracticeSettingCode-CISIS (OID 1.2.250.1.213.1.1.5.467),
  codes of TRE_A01-CadreExercice (1.2.250.1.213.1.1.4.9) and TRE_A00-ProducteurDocNonPS.
- ``confidentialityCode``: HL7 v3 Confidentiality (2.16.840.1.113883.5.25), restricted to the
  N / R / V levels the CI-SIS uses for a document.

The J02, J04 and J07 contents are those of the value sets shipped with the StrucMin schematron
the tests run (version labels 2024-09 to 2024-12); ASS_X04 is the 2025-04-15 version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medcourier.engine.errors import RenderError
from medcourier.engine.model import Document

LOINC_SYSTEM = "2.16.840.1.113883.6.1"
CLASS_CODE_SYSTEM = "1.2.250.1.213.1.1.4.1"  # TRE_A03-ClasseDocument
FORMAT_CODE_SYSTEM = "1.3.6.1.4.1.19376.1.2.3"  # TRE_A11-IheFormatCode
CONFIDENTIALITY_SYSTEM = "2.16.840.1.113883.5.25"  # HL7 v3 Confidentiality
SECTEUR_ACTIVITE_SYSTEM = "1.2.250.1.71.4.2.4"  # TRE_R02-SecteurActivite
CADRE_EXERCICE_SYSTEM = "1.2.250.1.213.1.1.4.9"  # TRE_A01-CadreExercice
PRODUCTEUR_NON_PS_SYSTEM = "1.2.250.1.213.1.1.4.6"  # TRE_A00-ProducteurDocNonPS

J07_NAME = "JDV_J07-XdsTypeCode-CISIS (1.2.250.1.213.1.1.5.471)"
J02_NAME = "JDV_J02-XdsHealthcareFacilityTypeCode-CISIS (1.2.250.1.213.1.1.5.466)"
J04_NAME = "JDV_J04-XdsPracticeSettingCode-CISIS (1.2.250.1.213.1.1.5.467)"
J10_NAME = "JDV_J10-XdsFormatCode-CISIS (1.2.250.1.213.1.1.5.465)"


@dataclass(frozen=True)
class Code:
    """A coded value as both CDA (``code``/``displayName``/``codeSystem``) and XDS need it."""

    code: str
    display: str
    system: str
    system_name: str | None = None


# --- typeCode (JDV_J07) and classCode (ASS_X04 -> TRE_A03) ----------------------------------

# TRE_A03-ClasseDocument display names, as JDV_J57-ClassCode-DMP lists them.
CLASS_DISPLAY: dict[str, str] = {
    "10": "Compte rendu",
    "11": "Synthèse",
    "31": "Imagerie médicale",
    "42": "Prescription",
    "43": "Dispensation",
    "44": "Plan de soins, protocole de soins",
    "45": "Traitement administré",
    "52": "Certificat, déclaration",
    "60": "Données de remboursement",
    "90": "Autres documents déposés par le patient",
    "95": "Document de gestion",
}

# LOINC typeCode -> (JDV_J07 display name, TRE_A03 class by ASS_X04). The documents a care
# producer sends as a PDF or an image; codes for structured CDA models (vaccination notes,
# DLU...) and patient-deposited documents are deliberately left out.
#
# Codes often seen in other countries' XDS affinity domains are *not* in JDV_J07 and are
# therefore refused: 18842-5 (discharge summary: use 11490-0 "Lettre de liaison à la sortie" or
# 34133-9), 57133-1 (referral note: use 96349-6 "Lettre d'adressage"), 28570-0 (procedure note:
# use 34874-8, 11505-5 or 70004-7) and 11526-1 (pathology study: use 60568-3).
J07_LOINC: dict[str, tuple[str, str]] = {
    "11369-6": ("Historique des vaccinations", "52"),
    "11488-4": ("CR ou fiche de consultation ou de visite", "10"),
    "11490-0": ("Lettre de liaison à la sortie d'un établissement de soins", "10"),
    "11502-2": ("CR d'examens biologiques", "10"),
    "11505-5": ("CR d'acte thérapeutique (autre)", "10"),
    "11506-3": ("CR ou fiche de suivi de soins par auxiliaire médical", "10"),
    "15507-7": ("CR de passage aux urgences", "10"),
    "15508-5": ("CR d'accouchement", "10"),
    "18748-4": ("CR d'imagerie médicale", "31"),
    "18761-7": (
        "Note de transfert (dont lettre de liaison à l'entrée en établissement de soins)",
        "11",
    ),
    "34112-3": ("CR hospitalier (séjour)", "10"),
    "34133-9": ("Synthèse d'épisode de soins", "11"),
    "34749-2": ("CR de consultation pré-anesthésique", "10"),
    "34794-8": ("CR de réunion de concertation pluridisciplinaire", "10"),
    "34874-8": ("CR opératoire", "10"),
    "51851-4": ("Document administratif", "95"),
    "51969-4": ("CR de génétique moléculaire", "10"),
    "52040-3": ("Document encapsulant une image d'illustration non DICOM", "31"),
    "57828-6": ("Prescription (autre)", "42"),
    "57833-6": ("Prescription de produits de santé", "42"),
    "60568-3": ("CR d'anatomie et de cytologie pathologiques", "10"),
    "60591-5": ("Synthèse médicale", "11"),
    "67851-6": ("CR d'admission", "10"),
    "70004-7": ("CR d'acte diagnostique (autre)", "10"),
    "77436-4": ("CR d'anesthésie", "10"),
    "78513-9": ("CR de consultation en ophtalmologie", "10"),
    "85208-7": ("CR de télémédecine", "10"),
    "89601-9": ("Certificat médical", "52"),
    "96349-6": ("Lettre d'adressage", "10"),
}

# --- formatCode (ASS_A12 -> TRE_A11) ---------------------------------------------------------

# Media type of the CDA body -> (formatCode, TRE_A11 display name).
FORMAT_CODES: dict[str, tuple[str, str]] = {
    "application/pdf": ("urn:ihe:iti:xds-sd:pdf:2008", "Document à corps non structuré en Pdf/A-1"),
    "text/plain": ("urn:ihe:iti:xds-sd:text:2008", "Document à corps non structuré en texte brut"),
    "text/rtf": ("urn:ihe:iti-fr:xds-sd:rtf:2010", "Document à corps non structuré en format rtf"),
    "image/jpeg": (
        "urn:ihe:iti-fr:xds-sd:jpeg:2010",
        "Document à corps non structuré en format jpeg",
    ),
    "image/tiff": (
        "urn:ihe:iti-fr:xds-sd:tiff:2010",
        "Document à corps non structuré en format tiff",
    ),
}

# Names senders use for the same formats; the CDA body always carries the canonical one.
MEDIA_TYPE_ALIASES: dict[str, str] = {
    "application/rtf": "text/rtf",
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/tif": "image/tiff",
}

# A PNG has no formatCode; it is converted to this (lossless) type when the route allows it.
PNG_MEDIA_TYPE = "image/png"
PNG_CONVERTED_MEDIA_TYPE = "image/tiff"

# --- healthcareFacilityTypeCode (JDV_J02) and practiceSettingCode (JDV_J04) -----------------

J02_FACILITY_TYPES: dict[str, tuple[str, str]] = {
    "EXP_PATIENT": ("Expression personnelle du patient", PRODUCTEUR_NON_PS_SYSTEM),
    "SNR": ("Service numérique référencé", PRODUCTEUR_NON_PS_SYSTEM),
    "SA01": ("Etablissement public de santé", SECTEUR_ACTIVITE_SYSTEM),
    "SA02": ("Hôpital militaire du Service de santé des armées", SECTEUR_ACTIVITE_SYSTEM),
    "SA03": ("Etablissement privé PSPH", SECTEUR_ACTIVITE_SYSTEM),
    "SA04": ("Etablissement privé non PSPH", SECTEUR_ACTIVITE_SYSTEM),
    "SA05": ("Centre de santé", SECTEUR_ACTIVITE_SYSTEM),
    "SA06": ("Autre structure du Service de santé des armées", SECTEUR_ACTIVITE_SYSTEM),
    "SA07": ("Cabinet individuel", SECTEUR_ACTIVITE_SYSTEM),
    "SA08": ("Cabinet de groupe", SECTEUR_ACTIVITE_SYSTEM),
    "SA09": ("Exercice en société", SECTEUR_ACTIVITE_SYSTEM),
    "SA10": ("Transporteur sanitaire", SECTEUR_ACTIVITE_SYSTEM),
    "SA12": ("Etablissement de soins et prévention", SECTEUR_ACTIVITE_SYSTEM),
    "SA13": ("Prévention et soins en entreprise", SECTEUR_ACTIVITE_SYSTEM),
    "SA14": (
        "Etablissements scolaires, universitaires et de formation hors champ FINESS",
        SECTEUR_ACTIVITE_SYSTEM,
    ),
    "SA15": ("PMI et Planification familiale", SECTEUR_ACTIVITE_SYSTEM),
    "SA16": ("Etablissement pour personnes handicapées", SECTEUR_ACTIVITE_SYSTEM),
    "SA17": ("Etablissement pour personnes âgées", SECTEUR_ACTIVITE_SYSTEM),
    "SA18": ("Etablissement aide à la famille", SECTEUR_ACTIVITE_SYSTEM),
    "SA19": (
        "Etablissements FINESS de formation aux professions sanitaires et sociales",
        SECTEUR_ACTIVITE_SYSTEM,
    ),
    "SA20": ("Etablissement pour la protection de l'enfance", SECTEUR_ACTIVITE_SYSTEM),
    "SA21": ("Etablissement d'hébergement et de réadaptation", SECTEUR_ACTIVITE_SYSTEM),
    "SA22": ("Recherche", SECTEUR_ACTIVITE_SYSTEM),
    "SA23": ("Assurance privée", SECTEUR_ACTIVITE_SYSTEM),
    "SA24": ("Organisme de sécurité sociale", SECTEUR_ACTIVITE_SYSTEM),
    "SA25": ("Laboratoire de biologie médicale", SECTEUR_ACTIVITE_SYSTEM),
    "SA26": ("Ministère ou Service déconcentré", SECTEUR_ACTIVITE_SYSTEM),
    "SA27": ("Collectivité territoriale", SECTEUR_ACTIVITE_SYSTEM),
    "SA28": ("Association ou organisme humanitaire", SECTEUR_ACTIVITE_SYSTEM),
    "SA29": ("Laboratoire d'analyses et de biologie médicale", SECTEUR_ACTIVITE_SYSTEM),
    "SA30": ("Autre établissement sanitaire", SECTEUR_ACTIVITE_SYSTEM),
    "SA31": (
        "Répartition et Distribution de médicaments et dispositifs médicaux",
        SECTEUR_ACTIVITE_SYSTEM,
    ),
    "SA32": (
        "Fabrication, Exploitation et Importation de médicaments et dispositifs médicaux",
        SECTEUR_ACTIVITE_SYSTEM,
    ),
    "SA33": ("Pharmacie d'officine", SECTEUR_ACTIVITE_SYSTEM),
    "SA34": ("Centre de dialyse", SECTEUR_ACTIVITE_SYSTEM),
    "SA35": ("Para-pharmacie", SECTEUR_ACTIVITE_SYSTEM),
    "SA36": ("Centre anti-cancer", SECTEUR_ACTIVITE_SYSTEM),
    "SA37": ("Centre de transfusion sanguine", SECTEUR_ACTIVITE_SYSTEM),
    "SA38": ("Pharmacie minière", SECTEUR_ACTIVITE_SYSTEM),
    "SA39": ("Pharmacie mutualiste", SECTEUR_ACTIVITE_SYSTEM),
    "SA40": ("Secteur privé, praticien hospitalier temps plein", SECTEUR_ACTIVITE_SYSTEM),
    "SA41": ("Autre établissement du domaine social ou médico-social", SECTEUR_ACTIVITE_SYSTEM),
    "SA42": ("Appareillage médical", SECTEUR_ACTIVITE_SYSTEM),
    "SA43": ("Secteur non défini", SECTEUR_ACTIVITE_SYSTEM),
    "SA44": ("Recrutement ou Gestion RH", SECTEUR_ACTIVITE_SYSTEM),
    "SA45": ("Communication, Marketing, Consulting, Média", SECTEUR_ACTIVITE_SYSTEM),
    "SA46": (
        "Fabrication, Exploitation, Importation, Répartition, Distribution médicaments et "
        "dispositifs médicaux",
        SECTEUR_ACTIVITE_SYSTEM,
    ),
    "SA47": ("Incendie et secours", SECTEUR_ACTIVITE_SYSTEM),
    "SA48": (
        "Entreprise industrielle et tertiaire hors industrie pharmaceutique",
        SECTEUR_ACTIVITE_SYSTEM,
    ),
    "SA49": ("Entité Outre-Mer", SECTEUR_ACTIVITE_SYSTEM),
    "SA50": ("Permanence des soins ambulatoires hors cabinet", SECTEUR_ACTIVITE_SYSTEM),
    "SA51": ("Structure de coopération avec autorisation de soins", SECTEUR_ACTIVITE_SYSTEM),
    "SA52": ("Maison de santé ou Pôle de santé", SECTEUR_ACTIVITE_SYSTEM),
    "SA53": ("Siège administratif d'un établissement de santé", SECTEUR_ACTIVITE_SYSTEM),
    "SA54": ("Centre de dépistage et de prévention", SECTEUR_ACTIVITE_SYSTEM),
    "SA55": (
        "Laboratoire pharmaceutique préparant et délivrant des allergènes",
        SECTEUR_ACTIVITE_SYSTEM,
    ),
    "SA56": ("Propharmacie", SECTEUR_ACTIVITE_SYSTEM),
    "SA57": (
        "Structure de coopération avec mission de coordination de soins",
        SECTEUR_ACTIVITE_SYSTEM,
    ),
    "SA58": ("Entreprise de taxis", SECTEUR_ACTIVITE_SYSTEM),
    "SA59": ("Laboratoire de biologie médicale hors catégorie standard", SECTEUR_ACTIVITE_SYSTEM),
    "SA60": ("Centres médicaux SNCF", SECTEUR_ACTIVITE_SYSTEM),
    "SA61": (
        "Structure Dispensatrice à domicile d'Oxygène à usage médical",
        SECTEUR_ACTIVITE_SYSTEM,
    ),
    "SA63": (
        "Communauté professionnelle territoriale de santé et équipe de soins spécialisés",
        SECTEUR_ACTIVITE_SYSTEM,
    ),
    "SA64": ("Société de téléconsultation", SECTEUR_ACTIVITE_SYSTEM),
    "SA65": ("Antenne de pharmacie", SECTEUR_ACTIVITE_SYSTEM),
    "SA66": ("Services de Prévention et de Santé au Travail (SPST)", SECTEUR_ACTIVITE_SYSTEM),
    "SA67": ("Maisons médicales de garde (MMG)", SECTEUR_ACTIVITE_SYSTEM),
    "SA68": ("Services départementaux d'incendie et de secours", SECTEUR_ACTIVITE_SYSTEM),
    "SA69": ("Maisons de naissance", SECTEUR_ACTIVITE_SYSTEM),
}

J04_PRACTICE_SETTINGS: dict[str, tuple[str, str]] = {
    "EXP_PATIENT": ("Expression personnelle du patient", PRODUCTEUR_NON_PS_SYSTEM),
    "SNR": ("Service numérique référencé", PRODUCTEUR_NON_PS_SYSTEM),
    "AMBULATOIRE": ("Ambulatoire", CADRE_EXERCICE_SYSTEM),
    "AMO": ("Organisme d'assurance maladie obligatoire", CADRE_EXERCICE_SYSTEM),
    "DEPISTAGE": ("Dépistage", CADRE_EXERCICE_SYSTEM),
    "ESSMS": ("Etablissement ou Service Social ou Médico-Social", CADRE_EXERCICE_SYSTEM),
    "ETABLISSEMENT": ("Etablissement de santé", CADRE_EXERCICE_SYSTEM),
    "HAD": ("Hospitalisation à domicile", CADRE_EXERCICE_SYSTEM),
    "MAD": ("Maintien à domicile", CADRE_EXERCICE_SYSTEM),
    "PALLIATIF": ("Soins palliatifs", CADRE_EXERCICE_SYSTEM),
    "SAD": ("Soins à domicile", CADRE_EXERCICE_SYSTEM),
    "SAMU_SMUR": ("SAMU/SMUR", CADRE_EXERCICE_SYSTEM),
}

# --- confidentialityCode ---------------------------------------------------------------------

# N is what the DMP expects for an ordinary document; R and V restrict it further. Display
# names are those of the HL7 v3 code system, capitalised as the ANS example document does.
CONFIDENTIALITY: dict[str, str] = {
    "N": "Normal",
    "R": "Restricted",
    "V": "Very restricted",
}


class XdsOptions(BaseModel):
    """The route options every DMP-bound format shares (the CDA, and the ORU that wraps it).

    Codes are checked against the CI-SIS value sets when the configuration is loaded, so a
    typo fails at start-up rather than on the first document.
    """

    model_config = ConfigDict(extra="forbid")

    healthcare_facility_type: str = Field(
        default="SA01",
        description=f"healthcareFacilityTypeCode, from {J02_NAME}; SA01 = public hospital",
    )
    practice_setting: str = Field(
        default="ETABLISSEMENT",
        description=f"practiceSettingCode, from {J04_NAME}; ETABLISSEMENT = health establishment",
    )
    confidentiality: Literal["N", "R", "V"] = Field(
        default="N", description="confidentialityCode (HL7 v3 Confidentiality): N, R or V"
    )
    allow_png_conversion: bool = Field(
        default=True,
        description="convert a PNG (no XDS formatCode) to lossless TIFF instead of refusing it",
    )
    allow_types_outside_j07: bool = Field(
        default=False,
        description=(
            f"accept LOINC document types outside {J07_NAME}; the DMP refuses such documents, "
            "so only enable this for receivers that are not the DMP"
        ),
    )

    @field_validator("healthcare_facility_type")
    @classmethod
    def _facility_type_in_j02(cls, value: str) -> str:
        if value not in J02_FACILITY_TYPES:
            raise ValueError(f"{value!r} is not in {J02_NAME}")
        return value

    @field_validator("practice_setting")
    @classmethod
    def _practice_setting_in_j04(cls, value: str) -> str:
        if value not in J04_PRACTICE_SETTINGS:
            raise ValueError(
                f"{value!r} is not in {J04_NAME} (one of {', '.join(J04_PRACTICE_SETTINGS)})"
            )
        return value


@dataclass(frozen=True)
class XdsMetadata:
    """What the DMP indexes a document by, and what the CDA header repeats.

    ``class_code`` is None only for a type outside JDV_J07 that a route allowed: ASS_X04 has no
    class for it, and guessing one would misfile the document.
    ``media_type`` is the type of the CDA body, after any conversion (a PNG becomes a TIFF).
    """

    type_code: Code
    class_code: Code | None
    format_code: Code
    media_type: str
    healthcare_facility_type: Code
    practice_setting: Code
    confidentiality: Code
    language: str = "fr-FR"


def media_type_key(content_type: str) -> str:
    """``Image/JPG; q=1`` -> ``image/jpeg``: parameters dropped, case folded, aliases resolved."""
    key = content_type.split(";", 1)[0].strip().lower()
    return MEDIA_TYPE_ALIASES.get(key, key)


def body_media_type(content_type: str, *, allow_png_conversion: bool) -> str:
    """The media type the CDA body will carry for a document of ``content_type``.

    Only media types with a formatCode in ASS_A12 / JDV_J10 can be shared in the DMP. A PNG has
    none, so it becomes a TIFF (converted by the renderer) when the route allows it.

    :raises RenderError: the type has no formatCode and cannot be converted.
    """
    key = media_type_key(content_type)
    if key in FORMAT_CODES:
        return key
    if key == PNG_MEDIA_TYPE:
        if allow_png_conversion:
            return PNG_CONVERTED_MEDIA_TYPE
        raise RenderError(
            "a PNG has no XDS formatCode in "
            f"{J10_NAME}; enable allow_png_conversion to send it as TIFF"
        )
    raise RenderError(
        f"content type {content_type!r} has no XDS formatCode in {J10_NAME}; "
        f"supported: {', '.join(sorted(FORMAT_CODES))} (and image/png, converted)"
    )


def document_type(loinc: str, *, allow_outside_j07: bool, fallback_display: str = "") -> Code:
    """The typeCode for a LOINC document type, with the JDV_J07 display name.

    :raises RenderError: the code is not in the JDV_J07 table and the route does not allow it.
    """
    code = loinc.strip()
    known = J07_LOINC.get(code)
    if known is not None:
        return Code(code, known[0], LOINC_SYSTEM, "LOINC")
    if not code:
        raise RenderError("the document type (a LOINC code from JDV_J07) is missing")
    if not allow_outside_j07:
        raise RenderError(
            f"document type {code!r} is not in {J07_NAME}: the DMP refuses it; "
            f"known types: {', '.join(sorted(J07_LOINC))}"
        )
    return Code(code, fallback_display.strip() or code, LOINC_SYSTEM, "LOINC")


def document_class(loinc: str) -> Code | None:
    """The classCode ASS_X04 associates with a JDV_J07 LOINC type, or None outside the table."""
    known = J07_LOINC.get(loinc.strip())
    if known is None:
        return None
    class_code = known[1]
    return Code(class_code, CLASS_DISPLAY[class_code], CLASS_CODE_SYSTEM)


def xds_metadata(document: Document, options: XdsOptions) -> XdsMetadata:
    """Derive every XDS metadata value of ``document`` for a route's ``options``.

    :raises RenderError: the document type is outside JDV_J07 (unless allowed), or its media
        type has no formatCode and cannot be converted.
    """
    type_code = document_type(
        document.document_type,
        allow_outside_j07=options.allow_types_outside_j07,
        fallback_display=document.title,
    )
    media_type = body_media_type(
        document.content_type, allow_png_conversion=options.allow_png_conversion
    )
    format_code, format_display = FORMAT_CODES[media_type]
    facility_display, facility_system = J02_FACILITY_TYPES[options.healthcare_facility_type]
    setting_display, setting_system = J04_PRACTICE_SETTINGS[options.practice_setting]
    return XdsMetadata(
        type_code=type_code,
        class_code=document_class(type_code.code),
        format_code=Code(format_code, format_display, FORMAT_CODE_SYSTEM),
        media_type=media_type,
        healthcare_facility_type=Code(
            options.healthcare_facility_type, facility_display, facility_system
        ),
        practice_setting=Code(options.practice_setting, setting_display, setting_system),
        confidentiality=Code(
            options.confidentiality,
            CONFIDENTIALITY[options.confidentiality],
            CONFIDENTIALITY_SYSTEM,
            "Confidentiality",
        ),
    )
