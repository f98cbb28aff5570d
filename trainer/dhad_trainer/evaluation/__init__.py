"""Arabic benchmark evaluation (the AceGPT suites): loaders, answer parsing, metrics, duplicate
detection, generation and log-likelihood scoring, and reports.

Torch is only imported by `runner` (HFModelRunner), so loading, parsing and metrics stay light.
May import data/, storage/ and llm/ (the endpoint client, for the scoring judge); never stages/, runtime/
or local/ (RLAIF's judges come in as a `Judge`).
"""

from dhad_trainer.evaluation.duplicates import DuplicateReport, find_duplicates
from dhad_trainer.evaluation.job import EvalSettings, load_references, run_eval
from dhad_trainer.evaluation.loaders import SUITES, EvalItem, ObjectStore, load_suite
from dhad_trainer.evaluation.parsing import parse_answer, parse_choice, parse_yes_no
from dhad_trainer.evaluation.report import headline_scores, write_report
from dhad_trainer.evaluation.scoring import (
    GENERATE,
    JUDGED,
    LOGLIKELIHOOD,
    PAIRWISE,
    SCORES,
    Judge,
    ModelRunner,
    SuiteResult,
    score_suite,
)

__all__ = [
    "GENERATE",
    "JUDGED",
    "LOGLIKELIHOOD",
    "PAIRWISE",
    "SCORES",
    "SUITES",
    "DuplicateReport",
    "EvalItem",
    "EvalSettings",
    "Judge",
    "ModelRunner",
    "ObjectStore",
    "SuiteResult",
    "find_duplicates",
    "headline_scores",
    "load_references",
    "load_suite",
    "parse_answer",
    "parse_choice",
    "parse_yes_no",
    "run_eval",
    "score_suite",
    "write_report",
]
