"""bench/oracle_agreement.py: the oracle's agreement with the target classes of a run's synthetic tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import CONFIGS, import_bench, run_bench, user_error


def test_oracle_agreement_names_a_missing_synthesize_stage(tmp_path: Path) -> None:
    """bench/oracle_agreement.py on a run with no synthetic tiles says which stage to run, exit code 2."""
    proc = run_bench("oracle_agreement.py", "--config", str(CONFIGS / "smoke.yaml"), "--run-dir",
                     str(tmp_path / "run"), "--budget", "1pct")
    message = user_error(proc)
    assert str(tmp_path / "run" / "synthesize" / "1pct" / "guided" / "manifest.csv") in message
    assert "synthesize stage" in message


def test_oracle_agreement_counts_per_class() -> None:
    """Agreement overall and per class; a class with no tiles reads None, not a division by zero."""
    agreement = import_bench("oracle_agreement").agreement
    result = agreement(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), ["a", "b", "c"])
    assert result["agreement"] == pytest.approx(0.75)
    assert result["per_class"]["a"] == {"tiles": 2, "agreement": 0.5}
    assert result["per_class"]["b"] == {"tiles": 2, "agreement": 1.0}
    assert result["per_class"]["c"] == {"tiles": 0, "agreement": None}
