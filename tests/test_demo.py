"""``digitstream demo`` runs the seed's whole flow and prints its summary."""

from __future__ import annotations

import subprocess
import sys

from digitstream.tools.reader import iter_results


def test_demo_end_to_end(tmp_path, model_dir, digits, expected_texts):
    output = tmp_path / "digits.out"
    result = subprocess.run(
        [sys.executable, "-m", "digitstream.cli", "demo", "--model", str(model_dir),
         "--output", str(output)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = result.stderr + result.stdout
    for words in ("messages", "accuracy", "throughput", "latency", "metrics UI", str(output)):
        assert words in summary, summary
    with open(output, "rb") as f:
        texts = [p.decode() for group in iter_results(f) for p in group.to_list()]
    assert texts == expected_texts
    assert "1,797 results, 0 errors" in summary
