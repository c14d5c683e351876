"""Benchmarks of the gateway against a plain aiohttp ceiling; run ``python -m benchmarks.run``."""
