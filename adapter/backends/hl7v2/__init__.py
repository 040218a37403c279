"""A legacy scheduler reached over HL7v2/MLLP (``backend.kind = "hl7v2"``): see ``backend``."""
