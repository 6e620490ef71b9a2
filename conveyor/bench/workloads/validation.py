"""Validation: a long structured output (a shipping order form) whose fields are checked as
they complete. An invalid field aborts the call at once and the error goes back to the model;
a valid form is checked as a whole at its end. Both cases are measured.

The grammar that constrains the call sees the form without its formats (an e-mail address,
a date), so that the model can write an invalid value; the tool checks the full form."""

from __future__ import annotations

import copy
from typing import Any

from conveyor.bench.workloads.base import Case, Workload, WorkloadOptions, system, user
from conveyor.tools.builtin.validate import ValidateTool

FORM: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "minLength": 1},
        "email": {"type": "string", "format": "email"},
        "ship_date": {"type": "string", "format": "date"},
        "country": {"enum": ["Portugal", "Norway", "Canada", "Kenya", "Other"]},
        "address": {"type": "string", "minLength": 5},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"product": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
                "required": ["product", "quantity"],
                "additionalProperties": False,
            },
        },
        "gift_message": {"type": "string"},
        "delivery_notes": {"type": "string"},
    },
    "required": [
        "customer",
        "email",
        "ship_date",
        "country",
        "address",
        "items",
        "gift_message",
        "delivery_notes",
    ],
    "additionalProperties": False,
}
SYSTEM = (
    "You file shipping orders with the submit_order tool: copy the customer's details exactly as given, "
    "write a warm gift message of two sentences and delivery notes of two sentences. If the tool reports "
    "an error, reply with one sentence that tells the customer which detail to fix."
)
ORDER = (
    "Customer: Dana Moss. E-mail: {email}. Ship on 2025-03-14 to Canada, 88 Queen Street West, Toronto. "
    "Items: 2 desk lamps and 1 office chair. It is a birthday present for her brother; deliveries go to "
    "the back door after 5 pm."
)


def grammar_form(form: dict[str, Any]) -> dict[str, Any]:
    """The form without string formats: what the logits constraint enforces."""
    relaxed = copy.deepcopy(form)
    for prop in relaxed["properties"].values():
        prop.pop("format", None)
    return relaxed


def _valid(results, text: str) -> bool:
    return bool(results) and results[-1].content.strip().strip('"') == "ok"


def _rejected(results, text: str) -> bool:
    """The e-mail field was rejected."""
    return bool(results) and results[0].rejected and "email" in results[0].content


def build(options: WorkloadOptions) -> Workload:
    tool = ValidateTool(
        FORM, name="submit_order", description="Submit a shipping order; each field is checked as it arrives."
    )
    tool.parameters = grammar_form(FORM)
    cases = [
        Case(
            "validation-valid",
            (system(SYSTEM), user(ORDER.format(email="dana.moss@example.com"))),
            ("submit_order",),
            max_tokens=400,
            check=_valid,
        ),
        Case(
            "validation-invalid",
            (system(SYSTEM), user(ORDER.format(email="dana.moss.example.com"))),
            ("submit_order",),
            max_tokens=400,
            check=_rejected,
            rejects=True,
        ),
    ]
    return Workload("validation", cases, [tool])
