"""Evaluation harness: long-context tasks under sparse methods, fidelity metrics against dense, reports."""

from .metrics import (
    RecallRecorder,
    answer_score,
    attention_recall,
    density_summary,
    kl_divergence,
    perplexity,
    token_nll,
    top1_agreement,
)
from .runner import (
    EvalArgumentError,
    EvalResult,
    MethodSpec,
    evaluate,
    parse_lengths,
    parse_method_spec,
    parse_methods,
    parse_tasks,
    read_results,
    run_eval,
)

__all__ = [
    "EvalArgumentError",
    "EvalResult",
    "MethodSpec",
    "RecallRecorder",
    "answer_score",
    "attention_recall",
    "density_summary",
    "evaluate",
    "kl_divergence",
    "parse_lengths",
    "parse_method_spec",
    "parse_methods",
    "parse_tasks",
    "perplexity",
    "read_results",
    "run_eval",
    "token_nll",
    "top1_agreement",
    "write_report",
]


def write_report(*args, **kwargs):
    """See :func:`spotattn.eval.report.write_report` (imported lazily: it needs matplotlib)."""
    from .report import write_report as _write

    return _write(*args, **kwargs)
