"""`make bench`: run every benchmarks/bench_*.py, print one table, write all results as JSON.

Each benchmark prints one JSON document on stdout; this collects them into
benchmarks/results/latest.json and prints every `ratio*` and `*_p50_ms` number as a table row.
A benchmark that fails is reported with its error and does not stop the others.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run(script: Path) -> dict[str, Any]:
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=HERE.parent
    )
    elapsed = round(time.monotonic() - started, 1)
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {completed.returncode}: {' | '.join(tail)}", "seconds": elapsed}
    try:
        start = completed.stdout.index("{")
        result: dict[str, Any] = json.loads(completed.stdout[start:])
    except ValueError:
        return {"error": "printed no JSON", "seconds": elapsed}
    result["seconds"] = elapsed
    return result


def headline(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """The numbers worth a row: ratios and p50s, found at any depth."""
    rows: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for key, inner in value.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(inner, dict | list):
                rows.extend(headline(inner, name))
            elif "ratio" in key or key == "p50_ms" or key.endswith(("_mib", "_ms")):
                rows.append((name, inner))
    return rows


def main() -> int:
    results = {}
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", file=sys.stderr, flush=True)
        results[script.stem] = run(script)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "latest.json").write_text(json.dumps(results, indent=2))
    width = 0
    table: list[tuple[str, str]] = []
    for name, result in results.items():
        if "error" in result:
            table.append((name, f"FAILED: {result['error']}"))
            continue
        for key, value in headline(result):
            table.append((f"{name}: {key}", str(value)))
    width = max((len(key) for key, _ in table), default=0)
    for key, value in table:
        print(f"{key.ljust(width)}  {value}")
    print(f"\nall results: {HERE / 'results' / 'latest.json'}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
