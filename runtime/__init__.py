"""The runtime services embed: artifacts, sessions over the engines' C APIs, generation and latency reports.

Imports numpy, tokenizers, jinja2 and the engine libraries only: never torch, transformers, or the
export, calibration and engines packages.
"""
