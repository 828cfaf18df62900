"""An OpenAI-compatible inference gateway: the front door, validation, relay and metrics.

Imports from `engines` only the contract (`engines.base`, `engines.spec`) and the registry.
"""
