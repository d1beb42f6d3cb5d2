"""The ``kfopt`` command line. Importing this module does not import TensorFlow."""

from __future__ import annotations

import functools
import json
import sys
import traceback

import click

from . import __version__
from .errors import KfoptError

RECIPE_HELP = "Inline recipe like 'prune(target_sparsity=0.8)>quantize(mode=int8)', or a recipe YAML file."
MODEL_HELP = "A .keras/.h5 file, a SavedModel directory, or demo:mlp / demo:cnn (trained on the fly on digits)."
DATA_HELP = ("An .npz file with x_train, y_train, x_test, y_test (any tf.io.gfile URI), "
             "'py:module:function' returning (train, test) tf.data datasets, or 'digits'.")


def _handle_errors(command):
    """One readable line and exit 2 for user errors; a traceback only with --debug."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return command(*args, **kwargs)
        except KfoptError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {exc.one_line()}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; results written so far are kept in the output directory", err=True)
            sys.exit(130)
        except Exception as exc:
            if debug:
                traceback.print_exc()
            else:
                click.echo(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kfopt")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def main(debug: bool) -> None:
    """kfopt makes trained TensorFlow/Keras models smaller and faster.

    Techniques (prune, quantize, distill, accelerate, and any installed plugin)
    are chained into recipes; every candidate is measured on the held-out test
    split against the baseline in the same format.

    \b
    Examples:
      kfopt plugins
      kfopt optimize --model demo:mlp --data digits \\
          --recipe 'prune(target_sparsity=0.8)>quantize(mode=int8)' --out runs/demo
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with each technique's config schema).")
@_handle_errors
def plugins(as_json: bool) -> None:
    """List the techniques: kind, formats in and out, owning package, config keys."""
    from rich.console import Console

    from .plugins.manager import registry
    from .report import techniques_json, techniques_table

    techniques = registry()
    if as_json:
        click.echo(json.dumps(techniques_json(techniques), indent=2))
    else:
        Console().print(techniques_table(techniques))


@main.command()
@click.option("--model", "-m", required=True, help=MODEL_HELP)
@click.option("--data", "-d", default="digits", show_default=True, help=DATA_HELP)
@click.option("--recipe", "-r", required=True, help=RECIPE_HELP)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Directory for the baseline, the candidate and metrics.json.")
@click.option("--seed", default=0, show_default=True, help="Seed for data splits, training and calibration.")
@click.option("--epochs", default=40, show_default=True, help="Epochs to train a demo baseline (early stopping on validation).")
@click.option("--unsafe", is_flag=True, help="Allow models with Lambda layers (they run arbitrary code when loaded).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@_handle_errors
def optimize(model, data, recipe, out, seed, epochs, unsafe, as_json) -> None:
    """Run one recipe on one model in-process and measure the result.

    Writes OUT/baseline/, OUT/candidate/ and OUT/metrics.json. Exit code 0
    when the candidate is ok or skipped (this host cannot run the technique),
    1 when a technique failed, 2 for bad input.
    """
    from rich.console import Console

    from .optimize import METRICS_FILE, optimize as run
    from .progress import Reporter
    from .report import results_table

    result = run(model, data, recipe, out, seed=seed, unsafe=unsafe, epochs=epochs, reporter=Reporter())
    candidate = result["candidates"][0]
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        Console().print(results_table(result))
        click.echo(f"Results: {out}/{METRICS_FILE}" + (f"; model: {candidate['artifact']}" if candidate.get("artifact") else ""))
    if candidate["status"] == "skipped":
        click.echo(f"skipped: {candidate['reason']}", err=True)
    elif candidate["status"] == "failed":
        click.echo(f"failed: {candidate['reason']}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
