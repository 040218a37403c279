"""HL7v2 chapter 10 scheduling messages for a legacy scheduler behind MLLP (no dependency on adapter.scheduling).

* ``mapping``  - ``load_hl7v2_mapping(path) -> Hl7v2Mapping``: interface agreement + field locations (YAML).
* ``outbound`` - ``build_sqm`` / ``build_srm`` (S01/S02/S03/S04): ER7 built per the agreed version, validated by hl7apy.
* ``inbound``  - ``parse_siu`` / ``parse_srr`` / ``parse_sqr`` -> ``SiuEvent`` / ``SrrResult`` / ``SqrResult``.
* ``er7``      - the tolerant split-based reader, field paths, HL7 timestamps; ``escaping`` - ``\\F\\ \\S\\ ...``.
* ``inbox``    - ``SiuInbox`` (durable, de-duplicated raw store) and ``SiuListener`` (the MLLP handler: store, ACK).
* ``mirror``   - ``InboxApplier`` (parse and apply after the ACK, versioned) and ``mirror_write`` (event -> write).
* ``store``    - ``SiuStore``, the inbox + mirror state (``open_siu_store(state.url)``), the version rule
  ``supersedes``; ``store_sqlite`` - one host-local file.
* ``feed``     - ``SiuFeed``: inbox + listener + applier with start()/stop(); ``placer`` - ``Placer``: SQM/SRM with
  Confirmed / Refused / Unknown outcomes.
"""
