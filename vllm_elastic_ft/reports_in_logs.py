"""Read the FaultReports a vLLM deployment wrote into its log.

Every report is one log line ending in ``| {json}`` (see
``watchdog/report.py``); the drill, the benchmarks and the end-to-end tests read
them back from the server log rather than through any side channel.
"""

from __future__ import annotations

import json
import re

_REPORT_LINE = re.compile(r"FaultReport #\d+ .*? \| (\{.*\})\s*$")


def fault_reports(log_text: str) -> list[dict]:
    """Every FaultReport in ``log_text``, in log order."""
    reports = []
    for line in log_text.splitlines():
        match = _REPORT_LINE.search(line)
        if match:
            reports.append(json.loads(match.group(1)))
    return reports
