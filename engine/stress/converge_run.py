"""Run a convergence case (:mod:`~engine.stress.convergence`): one ``engine
migrate`` process with the strategy's arguments, its JSON report read back."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from engine.stress.convergence import (ConvergenceCase, ConvergenceObservation,
                                       ConvergenceVerdict, classify_convergence,
                                       migrate_arguments)

__all__ = ["ConvergenceResult", "run_convergence_case"]

#: beyond the case's bound: start-up, the final pass, the cancel, the cleanup
SLACK_SECONDS = 60.0


@dataclass(frozen=True)
class ConvergenceResult:
    case: ConvergenceCase
    observation: ConvergenceObservation
    verdict: ConvergenceVerdict
    expected: bool
    detail: str
    seconds: float

    def to_dict(self) -> dict:
        return {"case": self.case.to_dict(), "verdict": self.verdict.value,
                "expected": self.expected, "detail": self.detail,
                "seconds": round(self.seconds, 2),
                "observation": self.observation.__dict__}


def run_convergence_case(case: ConvergenceCase) -> ConvergenceResult:
    """Migrate once with *case*'s strategy; bounded (a hang is killed and broken)."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="engine-converge-") as tmp:
        report = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "engine", "migrate", *migrate_arguments(case),
               "--json", report, "--quiet"]
        # A session of its own: a hung run goes with its destination and vCPUs.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=case.bound + SLACK_SECONDS)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            rc, stderr = -1, f"hung: not over {case.bound + SLACK_SECONDS:g} s after start"
        try:
            with open(report) as f:
                rep = json.load(f)
        except (OSError, ValueError):
            rep = None
    obs = ConvergenceObservation.from_report(rc, rep, stderr)
    verdict, expected, detail = classify_convergence(case, obs)
    return ConvergenceResult(case, obs, verdict, expected, detail, time.monotonic() - t0)
