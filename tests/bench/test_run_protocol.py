"""bench/run_protocol.py: shares the command line's error handling."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import CONFIGS, run_bench, user_error


def test_bench_script_reports_a_missing_data_root_without_traceback(tmp_path: Path) -> None:
    """The bench scripts share the CLI's error handling: a message naming the fix, exit code 2."""
    proc = run_bench("run_protocol.py", "--config", str(CONFIGS / "smoke.yaml"), "--run-dir", str(tmp_path / "run"),
                     env={"HISTODIFFUSION_DATA": str(tmp_path / "nowhere")})
    message = user_error(proc)
    assert "nowhere does not exist" in message and "HISTODIFFUSION_DATA" in message
