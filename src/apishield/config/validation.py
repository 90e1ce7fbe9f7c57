"""What request validation against the contract may tune: bounds and payload detection.

The contract says what a request may look like; these keys cap what it leaves open
(strings without maxLength, arrays without maxItems, JSON depth, multipart parts), so an
unconstrained schema is never an unbounded one. Read by the `validate` and `injection`
steps; `strict` and `injection` are overridden per operation in `OperationPolicy`.
"""

from __future__ import annotations

from pydantic import Field

from apishield.config.units import Bytes, Model


class Injection(Model):
    """Payload detection in unconstrained request strings (checklist B6)."""

    sql: bool = True
    xss: bool = True
    shell: bool = True


class Validation(Model):
    """Request validation against the contract (checklist B1, B2, B4, B6)."""

    strict: bool = True  # unknown query parameters and body properties are refused
    max_string_length: int = Field(default=8192, ge=1)  # for strings without maxLength
    max_array_items: int = Field(default=1000, ge=1)  # for arrays without maxItems
    max_json_depth: int = Field(default=32, ge=1)
    max_json_keys: int = Field(default=10000, ge=1)  # object keys in one body, all levels
    max_errors: int = Field(default=10, ge=1)  # listed in a refusal
    max_parts: int = Field(default=100, ge=1)  # parts in one multipart/form-data body
    max_file_bytes: Bytes = 10 * 1024 * 1024  # one multipart part; the body limit still holds
    injection: Injection = Injection()
