"""The audit trail (IHE ATNA, BALP): one AuditEvent per FHIR transaction, delivered to the sinks
without ever losing one and without ever making an answer wait.

``events`` turns what the security middleware saw of a request into an AuditEvent; ``trail`` owns
the queue, the worker thread, the on-disk spool and the retries; ``sinks`` writes to a JSON-lines
file, an Audit Record Repository (FHIR ``POST AuditEvent``) or syslog over TLS (RFC 5424/5425).
"""
