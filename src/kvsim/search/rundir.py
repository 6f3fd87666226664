"""`SearchRun`: a search's run folder, the way Optuna's `Study` owns its storage.

Every file name of RUNDIR is defined here and nowhere else; `kvsim search`, `kvsim validate --run`,
`kvsim export --run` and the report read and write the folder through this object. Layout:

    study.db | study.journal   the embedded study (SQLite for one worker, journal file for several)
    search.json                the summary later commands read (format in `kvsim.search`)
    trials.parquet             one row per trial
    top/<rank>.json            the winners, best first (re-ranked on the validation samples)
    validation.parquet         `kvsim validate --run`: winners and presets, live, on the test samples
    report.html                rendered from the files above, again after every command that adds one
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl

from kvsim.errors import KvsimError
from kvsim.paths import read_json, write_atomically
from kvsim.policies.budget import Budget
from kvsim.policies.policy import Policy
from kvsim.search.split import Split

FORMAT_VERSION = 2


@dataclass(frozen=True)
class SearchRun:
    rundir: Path

    # --- file names -----------------------------------------------------------------------------

    @property
    def sqlite_path(self) -> Path:
        return self.rundir / "study.db"

    @property
    def journal_path(self) -> Path:
        return self.rundir / "study.journal"

    @property
    def summary_path(self) -> Path:
        return self.rundir / "search.json"

    @property
    def trials_path(self) -> Path:
        return self.rundir / "trials.parquet"

    @property
    def top_dir(self) -> Path:
        return self.rundir / "top"

    def top_spec_path(self, rank: int) -> Path:
        return self.top_dir / f"{rank}.json"

    @property
    def validation_path(self) -> Path:
        return self.rundir / "validation.parquet"

    @property
    def report_path(self) -> Path:
        return self.rundir / "report.html"

    # --- reading --------------------------------------------------------------------------------

    def summary(self) -> dict:
        if not self.summary_path.is_file():
            raise KvsimError(f"{self.rundir} is not a search run (no {self.summary_path.name}): run `kvsim search --out {self.rundir}` first")
        summary = read_json(self.summary_path, "search summary", "re-run the search")
        if summary.get("format_version") != FORMAT_VERSION:
            raise KvsimError(
                f"{self.summary_path} was written by another kvsim version (format {summary.get('format_version')}, this one reads "
                f"{FORMAT_VERSION}): re-run the search into a new folder"
            )
        return summary

    def split(self) -> Split:
        samples = self.summary()["samples"]
        return Split(tuple(samples["search"]), tuple(samples["validation"]), tuple(samples["test"]))

    def test_samples(self) -> list[str]:
        """The samples only the report's live comparison runs on; refused when there are none, since
        validating on the samples that chose the winner would report its training score."""
        test = list(self.split().test)
        if not test:
            raise KvsimError(
                f"{self.rundir} has no test samples: search again with --test above 0 and at least two samples per task, "
                "or run `kvsim validate --traces ... --policy ...` on samples of your choice"
            )
        return test

    def winners(self, top: int) -> list[tuple[Policy, Budget]]:
        """The best `top` policies, best first, renamed `top1-…`, `top2-…`."""
        entries = self.summary().get("top") or []
        if not entries:
            raise KvsimError(f"{self.summary_path} lists no finished trials: let the search complete some trials first")
        return [
            (replace(Policy.from_spec(read_json(self.rundir / e["spec"], "policy spec", "re-run the search")["policy"]),
                     name=f"top{e['rank']}-{e['name']}"), Budget(e["budget"]))
            for e in entries[:top]
        ]

    def trials(self) -> pl.DataFrame | None:
        return pl.read_parquet(self.trials_path) if self.trials_path.is_file() else None

    def validation(self) -> pl.DataFrame | None:
        return pl.read_parquet(self.validation_path) if self.validation_path.is_file() else None

    # --- writing (each file replaced atomically) ------------------------------------------------

    def write_summary(self, summary: dict) -> None:
        text = json.dumps({"format_version": FORMAT_VERSION, **summary}, indent=2) + "\n"
        write_atomically(self.summary_path, lambda tmp: tmp.write_text(text))

    def write_trials(self, table: pl.DataFrame) -> None:
        write_atomically(self.trials_path, table.write_parquet)

    def write_top_spec(self, rank: int, spec: dict) -> str:
        """Writes top/<rank>.json; returns its path relative to the run folder (what search.json records)."""
        self.top_dir.mkdir(exist_ok=True)
        text = json.dumps(spec, indent=2) + "\n"
        write_atomically(self.top_spec_path(rank), lambda tmp: tmp.write_text(text))
        return str(self.top_spec_path(rank).relative_to(self.rundir))

    def write_validation(self, table: pl.DataFrame) -> None:
        write_atomically(self.validation_path, table.write_parquet)
