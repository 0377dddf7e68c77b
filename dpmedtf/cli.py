"""The ``dpmedtf`` command line. It parses arguments and calls the library; it holds no logic.

Heavy imports (TensorFlow, dp_accounting) happen inside the commands that need them, so
``dpmedtf --help`` and the privacy calculator start fast.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

# typer 0.29 carries its own copy of click: its exceptions are not the installed click's.
from typer._click.exceptions import ClickException, UsageError

from dpmedtf import __version__
from dpmedtf.errors import DpmedtfError

app = typer.Typer(name="dpmedtf", no_args_is_help=True, add_completion=False,
                  help="Differentially private diagnostic models for medical imaging.")
privacy_app = typer.Typer(no_args_is_help=True, help="Privacy accountant calculator (DP-SGD, Poisson sampling).")
config_app = typer.Typer(no_args_is_help=True, help="Inspect and validate job configuration files.")
app.add_typer(privacy_app, name="privacy")
app.add_typer(config_app, name="config")


class AccountantChoice(str, Enum):
    rdp = "rdp"
    pld = "pld"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dpmedtf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Differentially private diagnostic models for medical imaging."""


# --- privacy -----------------------------------------------------------------------------------------

_DATASET = typer.Option(..., "--dataset-size", help="N: records in the training set (images, or patients).")
_BATCH = typer.Option(..., "--batch-size", help="B: expected batch size; sampling rate q = B/N (Poisson).")
_EPOCHS = typer.Option(None, "--epochs", help="Expected passes over the data; steps = ceil(E·N/B).")
_STEPS = typer.Option(None, "--steps", help="Optimizer steps (instead of --epochs).")
_DELTA = typer.Option(..., "--delta", help="δ; must be below 1/N.")
_ACCOUNTANT = typer.Option(AccountantChoice.rdp, "--accountant", help="Privacy accountant.")
_LARGE_DELTA = typer.Option(False, "--allow-large-delta",
                            help="Accept δ ≥ 1/N, which permits leaking a whole record.")


def _steps(dataset_size: int, batch_size: int, epochs: Optional[float], steps: Optional[int]) -> int:
    from dpmedtf.privacy import accounting

    if (epochs is None) == (steps is None):
        raise UsageError("give exactly one of --epochs or --steps")
    return steps if steps is not None else accounting.steps_for_epochs(dataset_size, batch_size, epochs)


@privacy_app.command("epsilon")
def privacy_epsilon(dataset_size: int = _DATASET, batch_size: int = _BATCH,
                    epochs: Optional[float] = _EPOCHS, steps: Optional[int] = _STEPS,
                    noise_multiplier: float = typer.Option(..., "--noise-multiplier", help="σ: noise std / clip norm."),
                    delta: float = _DELTA, accountant: AccountantChoice = _ACCOUNTANT,
                    allow_large_delta: bool = _LARGE_DELTA) -> None:
    """ε spent by a DP-SGD run, printed as one JSON object."""
    from dpmedtf.privacy import accounting

    schedule = accounting.DpSgdSchedule(dataset_size, batch_size,
                                        _steps(dataset_size, batch_size, epochs, steps), noise_multiplier)
    result = accounting.compute_epsilon(schedule, delta, accountant.value, allow_large_delta)
    typer.echo(json.dumps(result.to_json_dict(), indent=2))


@privacy_app.command("noise")
def privacy_noise(dataset_size: int = _DATASET, batch_size: int = _BATCH,
                  epochs: Optional[float] = _EPOCHS, steps: Optional[int] = _STEPS,
                  target_epsilon: float = typer.Option(..., "--target-epsilon", help="ε to reach at the last step."),
                  delta: float = _DELTA, accountant: AccountantChoice = _ACCOUNTANT,
                  sigma_tolerance: float = typer.Option(1e-5, "--sigma-tolerance",
                                                        help="σ is within this of the smallest that reaches the target."),
                  allow_large_delta: bool = _LARGE_DELTA) -> None:
    """The smallest noise multiplier σ that reaches a target ε, printed as one JSON object."""
    from dpmedtf.privacy import accounting

    calibration = accounting.calibrate_noise_multiplier(
        target_epsilon, delta, dataset_size, batch_size, _steps(dataset_size, batch_size, epochs, steps),
        accountant.value, sigma_tolerance, allow_large_delta)
    typer.echo(json.dumps(calibration.to_json_dict(), indent=2))


# --- config ------------------------------------------------------------------------------------------

@config_app.command("show")
def config_show(path: Path = typer.Argument(..., help="A job YAML file.")) -> None:
    """Validate a job file and print it resolved (every default filled in)."""
    import yaml

    from dpmedtf.config import config_to_dict, load_config

    typer.echo(yaml.safe_dump(config_to_dict(load_config(path)), sort_keys=False).rstrip())


@config_app.command("keys")
def config_keys() -> None:
    """List every setting with its default and meaning."""
    from dpmedtf.config import describe

    for key, default, doc in describe():
        typer.echo(f"{key} = {default}\n    {doc}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every error becomes one line on stderr and a non-zero exit."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="dpmedtf", standalone_mode=False)
    except typer.Abort:
        typer.echo("dpmedtf: aborted", err=True)
        sys.exit(130)
    except ClickException as exc:
        message = " ".join(exc.format_message().split())
        if message:  # empty when the usage text was already shown (no command given)
            typer.echo(f"dpmedtf: error: {message}", err=True)
        sys.exit(exc.exit_code)
    except DpmedtfError as exc:
        typer.echo(f"dpmedtf: error: {exc}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
