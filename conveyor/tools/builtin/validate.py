"""The `validate` tool: checks a structured output (a form) field by field as it streams.

Its parameters are the form's JSON schema. Each top-level field is validated against its
property subschema (or `additionalProperties`) the moment its value completes, and a bad
value cuts the call off at once with `ToolRejected("field 'email': ...")`, so the model
can correct itself before writing the rest. `finish` validates the whole object (required
fields, cross-field rules) and returns "ok", or raises with every error. The default
instance checks `DEMO_FORM`, a sign-up form.
"""

from __future__ import annotations

from typing import Any

from jsonschema import ValidationError
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from conveyor.tools.base import CallInfo, Tool, ToolRejected

DEMO_FORM: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 100, "description": "full name"},
        "email": {"type": "string", "pattern": r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "country": {"enum": ["Portugal", "Norway", "Canada", "Kenya", "Other"]},
        "newsletter": {"type": "boolean", "description": "whether to send the monthly newsletter"},
    },
    "required": ["name", "email", "age", "country"],
    "additionalProperties": False,
}


class ValidateTool(Tool):
    """Validates a form against `schema` (default `DEMO_FORM`) field by field; see the module
    docstring. `name` lets one server check several forms under different tool names."""

    side_effects = "none"

    def __init__(
        self, schema: dict[str, Any] | None = None, *, name: str = "validate", description: str | None = None
    ) -> None:
        self.schema = DEMO_FORM if schema is None else schema
        validator_for(self.schema).check_schema(self.schema)
        self.name = name
        self.parameters = self.schema
        fields = ", ".join(self.schema.get("properties", {}))
        self.description = (
            description or f"Submit the form (fields: {fields}); each field is checked as it arrives."
        )
        self._validator: Validator | None = None

    def start(self, call: CallInfo) -> None:
        """Build the validator (compiles the schema's patterns and references)."""
        self._checker()

    def on_field(self, key: str, value: Any) -> None:
        """Check one field against its subschema; a bad value raises ToolRejected."""
        subschema = self._field_schema(key)
        if subschema is None:
            raise ToolRejected(f"field {key!r}: not a field of this form")
        error = best_match(self._checker().evolve(schema=subschema).iter_errors(value))
        if error is not None:
            raise ToolRejected(f"field {key!r}: {error.message}")

    def finish(self, args: dict[str, Any]) -> str:
        errors = sorted(self._checker().iter_errors(args), key=lambda e: list(e.absolute_path))
        if errors:
            raise ValueError("; ".join(_describe(e) for e in errors))
        return "ok"

    def _checker(self) -> Validator:
        if self._validator is None:
            cls = validator_for(self.schema)
            self._validator = cls(self.schema, format_checker=cls.FORMAT_CHECKER)
        return self._validator

    def _field_schema(self, key: str) -> dict[str, Any] | bool | None:
        """The subschema of a top-level field: its property, else additionalProperties
        (None when the form allows no other fields)."""
        properties = self.schema.get("properties", {})
        if key in properties:
            return properties[key]
        extra = self.schema.get("additionalProperties", True)
        return None if extra is False else extra


def _describe(error: ValidationError) -> str:
    path = list(error.absolute_path)
    return f"field {path[0]!r}: {error.message}" if path else error.message
