"""Benchmark harness: imaging-scp against dcmtk storescp, Orthanc and pynetdicom's storescp.

Run with ``make bench`` (``python -m benchmarks.run``); see benchmarks/README.md.
"""
