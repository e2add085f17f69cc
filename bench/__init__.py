"""Benchmarks: raw onnxruntime ceilings, the service under load, Keras vs onnxruntime.

`make bench` (or `python -m bench`) runs every section and writes
`bench/results/<date>-<host>.json`; each section also runs alone (`python -m bench.raw`, ...).
"""
