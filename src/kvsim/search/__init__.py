"""Policy search on captured traces with Optuna: `kvsim search` and `kvsim.search.search`.

Modules, in the order a run uses them: `split` (search, validation and test samples), `space` (the policy a
trial evaluates), `objective` (what a trial measures), `storage` and `study` (where the study
lives, its sampler and pruner, dead workers' trials), `run` (checks, then trials in one or more
processes), `outputs`, `compare` and `report` (the files below; `rundir` names them), `pipeline` (all of it in order).

The run folder's files are named by `kvsim.search.rundir.SearchRun`, which `search()` returns.

search.json (format_version 2):

    study, storage             the study name and its storage as optuna-dashboard takes it (an SQLite
                               URL, a journal file path, or a PostgreSQL URL without the password)
    traces, traces_fingerprint the TraceSet folder (absolute) and its content hash
    mode, objective, tier      tier: "exact" (answer log-likelihood from the real model) or "proxy"
    budget                     a number (fraction of the prompt, or token count), or [low, high]
    samples                    {"search": [sample_id, ...] in evaluation order, "validation": [...], "test": [...]}
    trials                     counts by state
    top                        [{"rank", "name", "spec": "top/<rank>.json", "budget", "provenance",
                               "search_value", "validation": {answer_logprob, answer_match, kl, top1,
                               sim_score, kv_mib}}], best first after the validation re-ranking
    presets                    every preset at the winner's budget, scored like `top` on validation
    importances                {"all": {param: importance}, "winner_family": {"family": scorer, "values"}}
    layer_budgets              per-layer budgets relative to uniform of the winner and the presets
    settings                   every option of the run

`kvsim validate --run RUNDIR --top 3` runs `top[:3]` beside the presets on `samples.test` and writes
`validation.parquet`; `kvsim export --run RUNDIR` exports `top[0]`.
"""

from kvsim.search.objective import BudgetRange
from kvsim.search.pipeline import search
from kvsim.search.rundir import SearchRun
from kvsim.search.run import SearchSettings

__all__ = ["BudgetRange", "SearchRun", "SearchSettings", "search"]
