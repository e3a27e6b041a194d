"""What every benchmark script does at the end: print its table, write its JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def finish(result: dict, table: str, out: Optional[Path]) -> int:
    print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
