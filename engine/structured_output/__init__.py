"""Constrained decoding: requests whose output must match a JSON schema, regex, choice or grammar."""

from kvloom.engine.structured_output.params import GuidedDecodingParams, StructuredOutputsParams

__all__ = ["GuidedDecodingParams", "StructuredOutputsParams"]
