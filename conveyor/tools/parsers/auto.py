"""One parser for mixed responses: the hermes JSON formats and ```python fences together.

JSON calls come out exactly as `HermesParser` emits them, a python fence exactly as
`PythonParser` emits it (a call named "python", a Line per statement); call indices count
across both formats. Inside a python fence nothing else is recognised.
"""

from __future__ import annotations

from conveyor.tools.parsers.base import fold
from conveyor.tools.parsers.hermes import HERMES_MARKERS, TAG_MARKERS, HermesParser
from conveyor.tools.parsers.python_code import PYTHON_MARKERS, PythonBody


class AutoParser(HermesParser):
    """A HermesParser that also hosts python fences (see the module docstring)."""

    MARKERS = HERMES_MARKERS + PYTHON_MARKERS
    STRICT_MARKERS = TAG_MARKERS + PYTHON_MARKERS  # a python fence is the python tool's own format

    __slots__ = ("_body",)

    def __init__(self, lenient: bool = True) -> None:
        super().__init__(lenient)
        self._body: PythonBody | None = None

    def _open(self, marker: str) -> None:
        if fold(marker) in PYTHON_MARKERS:
            self._body = PythonBody(self._new_index(), self._emit)
        else:
            super()._open(marker)

    def _step(self, c: str) -> None:
        if self._body is None:
            super()._step(c)
        elif self._body.step(c):
            self._body = None
            self._line_start = False

    def _finish(self) -> None:
        if self._body is None:
            super()._finish()
        else:
            self._body.close()
            self._body = None
