"""``zipmoe-rt`` command line (click). Thin: parse options, call the library, print.

Errors are one line on stderr (``error: ...``) and exit status 1; set ``ZIPMOE_RT_DEBUG=1`` for
the traceback.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from . import __version__

MODEL_HELP = "a .zmoe file (default: the bundled SmolLM2 MoE, built on first use)"


class CliError(click.ClickException):
    """An error shown as one line."""

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def friendly_errors(fn):
    """Turn library exceptions into one clear line and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the CLI's job is to report, not crash
            if os.environ.get("ZIPMOE_RT_DEBUG"):
                raise
            msg = str(e) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
            raise CliError(msg or type(e).__name__) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zipmoe-rt")
def main():
    """zipmoe-rt: run Mixture-of-Experts models losslessly from compressed .zmoe files.

    Typical use: `zipmoe-rt chat` (bundled default model), or `zipmoe-rt convert HF_DIR -o
    model.zmoe` then `zipmoe-rt chat model.zmoe`.
    """


# -- format verbs -------------------------------------------------------------------------------
@main.command()
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="the .zmoe file to write")
@click.option("--chunks", type=click.IntRange(min=1), default=4, show_default=True,
              help="independently compressed exponent chunks per expert tensor (K)")
@click.option("--dense-encoding", type=click.Choice(["raw", "bitplane"]), default="raw",
              show_default=True, help="how to store non-expert tensors")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="compression threads [default: all cores]")
@click.option("--no-verify", is_flag=True, help="skip decoding the result and comparing it with the source")
@click.option("-f", "--force", is_flag=True, help="replace OUTPUT if it exists")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@friendly_errors
def convert(hf_dir, output, chunks, dense_encoding, threads, no_verify, force, quiet):
    """Convert a Hugging Face MoE checkpoint folder to .zmoe (lossless).

    Reads config.json, safetensors (single or sharded), tokenizer.json, tokenizer_config.json or
    chat_template.jinja and generation_config.json. Writes a temporary file and renames it only
    when complete and verified bit for bit against the source.
    """
    from .convert.converter import convert as do_convert
    from .convert.export import summarize
    out = do_convert(hf_dir, output, chunks=chunks, dense_encoding=dense_encoding, threads=threads,
                     verify=not no_verify, progress=not quiet, overwrite=force)
    click.echo(summarize(out, show_tensors=False).split("\n")[0])
    click.echo("\n".join(l for l in summarize(out, show_tensors=False).split("\n")
                         if l.startswith("  expert") or l.startswith("  dense")))


@main.command()
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="folder to write (must not exist or be empty)")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@friendly_errors
def export(model, output, quiet):
    """Write a .zmoe back as a Hugging Face folder (safetensors byte-identical to the source)."""
    from .convert.export import export as do_export
    do_export(model, output, progress=not quiet)
    click.echo(f"wrote {output}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@friendly_errors
def verify(model, quiet):
    """Check every checksum of a .zmoe file and that every exponent chunk decodes."""
    import zmoe
    from tqdm.auto import tqdm
    with zmoe.ZmoeReader(model) as r:
        with tqdm(total=len(r.tensors), unit="tensor", desc="verify", disable=quiet) as bar:
            r.verify(progress=lambda _: bar.update(1))
        click.echo(f"{model}: OK ({len(r.tensors)} tensors, {len(r.experts)} expert blocks, "
                   f"all checksums match)")


@main.command()
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--no-tensors", is_flag=True, help="metadata and totals only")
@friendly_errors
def inspect(model, no_tensors):
    """Print a .zmoe's metadata, tensor table and bits per weight (experts and dense)."""
    from .convert.export import summarize
    click.echo(summarize(model, show_tensors=not no_tensors))


if __name__ == "__main__":
    main()
