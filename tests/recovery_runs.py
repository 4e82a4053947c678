"""One recovery scenario of mipsec/lab/recovery.py run in the live lab, checked the way every
recovery lab test checks it: the namespaces are gone, no error, and traffic recovered both ways."""

from __future__ import annotations

import labs
from mipsec.lab.recovery import SCENARIOS, Scenario, run_scenario
from mipsec.lab.topology import existing_namespaces

RATE = 200.0


def run_recovered(name: str, prefix: str):
    """Run the scenario ``name`` under ``prefix`` (the lab's requirements first) and return its
    outcome once it is known to have recovered."""
    return run_checked(SCENARIOS[name], prefix)


def run_checked(scenario: Scenario, prefix: str):
    """``run_recovered`` for a scenario of another table (``mipsec.lab.hafail``) or of a test."""
    labs.require()
    outcome = run_scenario(scenario, RATE, prefix)
    assert existing_namespaces(prefix) == []
    assert outcome.error is None, outcome.error
    for direction, figures in outcome.directions.items():
        assert figures["recovered"], (direction, figures, outcome.detail.get("timeline"))
    return outcome
