"""What one run of ``fastlisten bench`` measured: the Report that the
runner fills, the bars judge and the report module renders (kept apart
from all three so that each can import it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List

__all__ = ["Report"]


@dataclass
class Report:
    """Everything one run of ``fastlisten bench`` measured (``asdict`` is the JSON)."""

    machine: Dict[str, Any]
    options: Dict[str, Any]
    servers: Dict[str, Dict[str, Any]]
    skipped: Dict[str, str]
    results: Dict[str, Dict[str, Dict[str, Any]]]
    shutdown: Dict[str, Dict[str, Any]]
    bars: List[Dict[str, Any]] = field(default_factory=list)
    failures: List[str] = field(default_factory=list)
    started_at: str = ""
    seconds: float = 0.0

    def to_json(self) -> Dict[str, Any]:
        """A JSON-able dict of the whole report."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Report":
        """The report a ``--json`` file holds."""
        return cls(**data)
