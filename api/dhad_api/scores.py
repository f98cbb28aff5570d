"""The headline score keys an evaluation produces, as status.scores and the report name them.

One place says which keys `Evaluation` settings give, so a pipeline gate can be checked against them
at apply time (the CEL below) and by the operator, without importing the trainer. The eval stage's
report (trainer/dhad_trainer/evaluation/report.py) writes exactly these keys;
tests/unit/test_pipeline_scores.py runs the real eval stage and compares.
"""

from __future__ import annotations

from dhad_api.stages import Evaluation, Suite

OPEN_SUITES = (Suite.VICUNA_80, Suite.ALPACA_EVAL)  # answers are judged against a reference system
OPEN_METHOD = "generate+judge"  # the method of every open-ended figure


def score_key(suite: str, method: str) -> str:
    """ "<suite>/<method>": a generation score and a log-likelihood score of one suite are different numbers."""
    return f"{suite}/{method}"


def produced_scores(evaluation: Evaluation) -> list[str]:
    """Every key these settings may put in status.scores, in suite order."""
    keys = []
    for suite in evaluation.suites:
        method = OPEN_METHOD if suite in OPEN_SUITES else evaluation.method.value
        keys.append(score_key(suite.value, method))
    return keys


def produced_cel(score: str, evaluation: str) -> str:
    """CEL that is true when the string expression `score` is a key the Evaluation at `evaluation` produces."""
    open_suites = [s.value for s in OPEN_SUITES]
    return (f"{evaluation}.suites.exists(s, {score} == s + '/' + "
            f"(s in {open_suites} ? '{OPEN_METHOD}' : {evaluation}.method))")
