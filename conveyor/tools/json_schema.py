"""Which JSON Schema keywords the output grammar enforces (structured outputs).

xgrammar compiles a schema into a grammar but skips keywords it does not implement (`not`,
`allOf`, `if`/`then`/`else`, `uniqueItems`, `dependentRequired`, ...): output under such a
schema could break it. `unsupported_keyword` finds the first keyword that is neither enforced
nor a pure annotation, so that the server refuses the schema with a 400 naming it instead.
"""

from __future__ import annotations

from typing import Any

# keywords the grammar enforces (checked against xgrammar 0.2 by feeding a violating instance)
ENFORCED = frozenset(
    {
        "type", "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "definitions",
        "properties", "required", "additionalProperties", "patternProperties", "propertyNames",
        "minProperties", "maxProperties", "dependentSchemas", "unevaluatedProperties",
        "items", "prefixItems", "minItems", "maxItems", "contains",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
        "minLength", "maxLength", "pattern", "format",
    }
)  # fmt: skip
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly"}
)
FORMATS = frozenset(
    {
        "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
        "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
    }
)  # fmt: skip
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "propertyNames", "contains", "unevaluatedProperties")


def unsupported_keyword(schema: Any, path: str = "schema") -> tuple[str, str] | None:
    """(keyword, where) of the first keyword the grammar would not enforce, or None."""
    if not isinstance(schema, dict):
        return None  # true / false schemas
    for key, value in schema.items():
        where = f"{path}.{key}"
        if key not in ENFORCED and key not in ANNOTATIONS:
            return key, path
        if key == "format" and value not in FORMATS:
            return f"format: {value}", path
        found = _inside(key, value, where)
        if found is not None:
            return found
    return None


def _inside(key: str, value: Any, where: str) -> tuple[str, str] | None:
    if key in _SCHEMA_MAPS and isinstance(value, dict):
        children = [(f"{where}.{name}", v) for name, v in value.items()]
    elif key in _SCHEMA_LISTS and isinstance(value, list):
        children = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    elif key in _SCHEMAS:
        children = [(where, value)]
    else:
        return None
    for child_path, child in children:
        found = unsupported_keyword(child, child_path)
        if found is not None:
            return found
    return None
