"""Policy search on captured traces with Optuna: `kvsim search` and `kvsim.search.search`.

Modules, in the order a run uses them: `split` (search / held-out samples), `space` (the policy a
trial evaluates), `objective` (what a trial measures), `storage` and `study` (where the study
lives, its sampler and pruner, dead workers' trials), `run` (checks, then trials in one or more
processes), `outputs` and `report` (the files below), `pipeline` (all of it in order).

RUNDIR after a run:

    study.db | study.journal   the embedded study (SQLite for one worker, journal file for several);
                               absent with --storage postgresql://...
    trials.parquet             one row per trial: number, state, sim_score (for pruned trials the
                               mean over the samples seen), kv_mib, budget, family,
                               pruned_after_samples, duration_s, worker, retry_of, infeasible,
                               policy (JSON spec), params (JSON)
    top/<rank>.json            the k best distinct policies, best first: {"policy": <spec>, "budget",
                               "provenance", "sim_score": {"search", "held_out"}, "kv_mib"};
                               `kvsim.policies.load_policy_spec(path)` reads the policy
    report.html                history or Pareto front, importances, per-layer budgets beside the
                               presets', winners and presets on the held-out samples
    search.json                the summary later commands read (written before the first trial and
                               completed at the end)

search.json (format_version 1):

    study, storage             the study name and its storage as optuna-dashboard takes it (an SQLite
                               URL, a journal file path, or a PostgreSQL URL without the password)
    traces, traces_fingerprint the TraceSet folder (absolute) and its content hash
    mode, objective, budget    budget: a number (fraction of the prompt, or token count), or
                               [low, high] for a Pareto study
    samples                    {"search": [sample_id, ...] in evaluation order, "held_out": [...]}
    trials                     counts by state
    top                        [{"rank", "spec": "top/<rank>.json", "budget", "provenance",
                               "sim_score": {"search", "held_out"}, "kv_mib"}], best first
    settings                   every option of the run

`kvsim validate --run RUNDIR --top 3` reads `top[:3]` (spec and budget), `traces`, `mode` and
`samples.held_out` from it.
"""

from kvsim.search.objective import BudgetRange
from kvsim.search.pipeline import search
from kvsim.search.run import SearchSettings

__all__ = ["BudgetRange", "SearchSettings", "search"]
