"""The headline score keys an evaluation produces, as status.scores and the report name them.

One place says which keys `Evaluation` settings give, so a pipeline gate can be checked against them
at apply time (the CEL below) and by the operator, without importing the trainer. The eval stage's
report (trainer/dhad_trainer/evaluation/report.py) writes exactly these keys;
tests/unit/test_pipeline_scores.py runs the real eval stage and compares.
"""

from __future__ import annotations

from dhad_api.stages import Evaluation, Suite

OPEN_SUITES = (Suite.VICUNA_80, Suite.ALPACA_EVAL)  # answers are judged against a reference system's


def score_key(suite: str, method: str) -> str:
    """ "<suite>/<method>": a generation score, a log-likelihood score and a judged figure are different numbers."""
    return f"{suite}/{method}"


def produced_scores(evaluation: Evaluation) -> list[str]:
    """Every key these settings may put in status.scores for the evaluated model, in suite order (a judged
    figure the report flags is left out of the scores, so "may")."""
    keys = []
    for suite in evaluation.suites:
        methods = [str(m) for m in evaluation.open_ended_metrics] if suite in OPEN_SUITES else [str(evaluation.method)]
        keys += [score_key(str(suite), m) for m in methods]
    return keys


def produced_cel(score: str, evaluation: str) -> str:
    """CEL that is true when the string expression `score` is a key the Evaluation at `evaluation` produces."""
    open_suites = [s.value for s in OPEN_SUITES]
    return (f"{evaluation}.suites.exists(s, s in {open_suites} ? {evaluation}.openEndedMetrics.exists(m, {score} == s + '/' + m)"
            f" : {score} == s + '/' + {evaluation}.method)")
