"""End-to-end jobs and the ``namm-transfer`` command line (demo, benchmarks, evaluation)."""
