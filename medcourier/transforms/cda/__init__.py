"""CDA R2 output for the French DMP (Dossier Médical Partagé) and the profiles that embed it.

A document leaves medcourier for the DMP as a CDA R2 *level 1* (non-structured) document: a
header that identifies the patient by the INS, the author by the RPPS and the organizations by
their national identifiers, and a ``nonXMLBody`` holding the file (PDF, text, RTF, JPEG or
TIFF) in Base64. The header follows the CI-SIS "Volet Structuration Minimale des Documents de
Santé"; the tests check every rendering with the official XML schema (CDA_extended.xsd) and the
StrucMin schematron, the same rules the DMP applies.

- :mod:`medcourier.transforms.cda.xds` derives the XDS/DMP metadata (typeCode, classCode,
  formatCode, practiceSettingCode, healthcareFacilityTypeCode, confidentialityCode) once, from
  the CI-SIS value sets, so the CDA header and the HL7 v2 "CDA in ORU" profile cannot disagree.
- :mod:`medcourier.transforms.cda.dmp` is the ``cda-dmp`` format plugin and exports
  :func:`~medcourier.transforms.cda.dmp.render_cda` for profiles that wrap the CDA themselves.
"""
