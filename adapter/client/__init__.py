"""The IHE ITI Scheduling Client actor: an HTTP client (``http``) and the ``sched-adapter client`` command."""
