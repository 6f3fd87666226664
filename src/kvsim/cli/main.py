"""Entry point of the `kvsim` command; subcommands live in sibling modules."""

import typer

from kvsim.cli import capture, export, policies, search, simulate, traces, validate
from kvsim.traces.models import silence_cache_rename_warning

silence_cache_rename_warning()

app = typer.Typer(
    name="kvsim",
    help="Find the best KV-cache eviction policy and per-layer budget for a model and a workload.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.command(name="capture")(capture.capture)
app.command(name="simulate")(simulate.simulate)
app.command(name="policies")(policies.policies)
app.command(name="search")(search.search)
app.command(name="validate")(validate.validate_command)
app.command(name="export")(export.export)
app.command(name="fidelity")(validate.fidelity_command)
app.add_typer(traces.app, name="traces")

if __name__ == "__main__":
    app()
