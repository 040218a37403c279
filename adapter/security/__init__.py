"""Access control for the FHIR endpoints: SMART on FHIR bearer tokens, patient context, rate limits.

``tokens`` validates JWT access tokens against the authorization server's keys, ``scopes`` reads
SMART v1/v2 scopes, ``policy`` says what each endpoint needs (and, for a patient-context token,
whether the request concerns that patient), and ``middleware`` applies all of it in front of the
application and hands every transaction to the audit trail (``adapter.audit``).
"""
