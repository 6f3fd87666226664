"""Entry point of the `kvsim` command; subcommands live in sibling modules."""

import warnings

import typer

from kvsim.cli import capture, export, policies, search, simulate, traces, validate

# transformers 5.24 renames `past_key_values=` to `cache=` (removal in 5.40) and warns on every
# forward; kvsim still passes the old name so the kvpress environment (transformers < 5.3) works.
# One warning per decode step buries the progress bars, so the command line silences that one.
warnings.filterwarnings("ignore", message=r".*`past_key_values` is deprecated", category=FutureWarning)

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
