"""Mixed-precision search: an Optuna study over precision plans whose result is a latency/accuracy Pareto front with
measured latency ratios, paired confidence intervals and a held-out confirmation.

    run_search(ws, evaluator, SearchSettings(budget=50, workdir="runs/yolov5n"))

Stages (search/study.py): reference -> sensitivity -> study -> warm start -> trials -> confirm -> report.
"""
from .records import LatencyBook, TrialRecord, records
from .settings import STRATEGIES, SearchSettings
from .study import SearchResult, SearchRun, run_search

__all__ = ["LatencyBook", "TrialRecord", "records", "STRATEGIES", "SearchSettings", "SearchResult", "SearchRun",
           "run_search"]
