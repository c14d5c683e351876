"""The Locust load kit: ``python -m loadtests SCENARIO`` (see README.md here)."""
