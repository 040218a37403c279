"""The conformance kit: R4/IHE profile checkers (``profiles``), the requirement checks (``kit``), reports."""
