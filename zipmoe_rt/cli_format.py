"""The container verbs of the ``zipmoe-rt`` command line: ``convert``, ``export``, ``verify`` and
``inspect`` (registered on :func:`zipmoe_rt.cli.main`, which imports this module; the
generation verbs live in :mod:`zipmoe_rt.cli`)."""
from __future__ import annotations

import os
from pathlib import Path

import click

from .cli_types import ModelPath
from .cli import CliError, default_model_if_none, friendly_errors, main, progress_wanted


@main.command()
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="the .zmoe file to write")
@click.option("--chunks", type=click.IntRange(min=1), default=4, show_default=True,
              help="independently compressed exponent chunks per expert tensor (K)")
@click.option("--dense-encoding", type=click.Choice(["raw", "bitplane"]), default="raw",
              show_default=True, help="how to store non-expert tensors")
@click.option("--expert-encoding", type=click.Choice(["bitplane", "raw"]), default="bitplane",
              show_default=True, help="raw keeps experts uncompressed (the raw-lru baseline)")
@click.option("--exp-codec", type=click.Choice(["huffman", "zstd"]), default="huffman",
              show_default=True, help="codec of the exponent chunks (format/SPEC.md §5.2)")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="compression threads [default: all cores]")
@click.option("--no-verify", is_flag=True, help="skip decoding the result and comparing it with the source")
@click.option("-f", "--force", is_flag=True, help="replace OUTPUT if it exists")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@friendly_errors
def convert(hf_dir, output, chunks, dense_encoding, expert_encoding, exp_codec, threads, no_verify,
            force, quiet):
    """Convert a Hugging Face MoE checkpoint folder to .zmoe (lossless).

    Reads config.json, safetensors (single or sharded), tokenizer.json, tokenizer_config.json or
    chat_template.jinja and generation_config.json. Writes a temporary file and renames it only
    when complete and verified bit for bit against the source.
    """
    from .convert.converter import convert as do_convert
    from .convert.export import summarize
    if output.endswith(("/", os.sep)):
        raise click.BadParameter(f"{output} names a folder; give the .zmoe file to write",
                                 param_hint="'-o' / '--output'")
    output = Path(output)
    if not output.parent.is_dir():
        raise CliError(f"-o/--output: the folder {output.parent} does not exist (create it "
                       f"first)")
    out = do_convert(hf_dir, output, chunks=chunks, dense_encoding=dense_encoding, threads=threads,
                     verify=not no_verify, progress=progress_wanted(quiet), overwrite=force,
                     expert_encoding=expert_encoding, exp_codec=exp_codec)
    click.echo(summarize(out, show_tensors=False).split("\n")[0])
    click.echo("\n".join(l for l in summarize(out, show_tensors=False).split("\n")
                         if l.startswith("  expert") or l.startswith("  dense")))


@main.command()
@click.argument("model", required=False, type=ModelPath(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="folder to write (must not exist or be empty)")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@friendly_errors
def export(model, output, quiet):
    """Write a .zmoe back as a Hugging Face folder (safetensors byte-identical to the source).

    MODEL: a .zmoe file (default: the bundled SmolLM2 MoE, built on first use).
    """
    model = default_model_if_none(model)
    from .convert.export import export as do_export
    do_export(model, output, progress=progress_wanted(quiet))
    click.echo(f"wrote {output}")


@main.command()
@click.argument("model", required=False, type=ModelPath(path_type=Path, dir_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
@friendly_errors
def verify(model, quiet):
    """Check every checksum of a .zmoe file, that every exponent chunk decodes and that the
    stored tokenizer and chat template load (and the template renders a sample conversation).

    MODEL: a .zmoe file (default: the bundled SmolLM2 MoE, built on first use).
    """
    model = default_model_if_none(model)
    import zmoe
    from tqdm.auto import tqdm

    from .engine.layout import expert_layouts
    from .families.check import check_reader
    with zmoe.ZmoeReader(model, use_mmap=False) as r:   # opening validates the index (SPEC §9);
        # pread, not a memory map: a file truncated meanwhile is an error, not SIGBUS
        check_reader(r, str(model))     # hyper-parameters agree with the shapes, as on load
        expert_layouts(r)               # and every expert block is one the runtime can build
        tok = check_stored_tokenizer(r.metadata, model)   # what run / chat load
        with tqdm(total=len(r.tensors), unit="tensor", desc="verify",
                  disable=not progress_wanted(quiet)) as bar:
            bad = r.verify(progress=lambda _: bar.update(1), keep_going=True)
        if bad:
            first = str(bad[0][1])
            more = ""
            if len(bad) > 1:
                names = ", ".join(repr(n) for n, _ in bad[1:9])
                more = (f"; {len(bad)} corrupt tensors in all, also {names}"
                        + (f" and {len(bad) - 9} more" if len(bad) > 9 else ""))
            raise zmoe.ZmoeError(first + more)
        click.echo(f"{model}: OK ({len(r.tensors)} tensors, {len(r.experts)} expert blocks, "
                   f"all checksums match{tok})")


#: What ``verify`` renders through a stored chat template.
_SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]


def check_stored_tokenizer(metadata: dict, path) -> str:
    """Load the tokenizer and compile the chat template stored in a container's metadata, as
    ``run`` / ``chat`` do (:func:`zipmoe_rt.api.tokenizer_from_source`), and render a sample
    conversation (system / user / assistant / user, with the generation prompt) through the
    template's bounded renderer, so that a template that never stops is refused here too.

    Args:
        metadata: the container's metadata (``ZmoeReader.metadata``).  path: named in errors.
    Returns:
        what was checked, for the verify summary (``"; tokenizer and chat template load"``),
        or "" when the file stores no tokenizer.
    Raises:
        ValueError: naming the file and the metadata key (``tokenizer.json``,
            ``tokenizer.chat_template`` or ``tokenizer.config``) that does not load, or a
            chat template whose render of the sample conversation passes a render budget
            (``... 'tokenizer.chat_template': chat_template: rendering stopped: ...``).
    """
    from zmoe.constants import Keys

    from .chat_template import compile_chat_template
    from .tokenizer import Tokenizer
    tok_json = metadata.get(Keys.Tokenizer.JSON)
    template = metadata.get(Keys.Tokenizer.CHAT_TEMPLATE)
    if template is not None:
        try:
            compile_chat_template(template)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: metadata {Keys.Tokenizer.CHAT_TEMPLATE!r} does not "
                             f"compile: {e}") from None
    if tok_json is None:
        return ""
    from tokenizers import Tokenizer as HFTokenizer
    try:
        HFTokenizer.from_str(tok_json)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise ValueError(f"{path}: metadata {Keys.Tokenizer.JSON!r} is not a tokenizer the "
                         f"tokenizers library loads: {e}") from None
    try:
        tok = Tokenizer.from_hf_config(tok_json, metadata.get(Keys.Tokenizer.CONFIG) or {}, template)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: metadata {Keys.Tokenizer.CONFIG!r} does not fit the stored "
                         f"tokenizer: {e}") from None
    if template is not None:
        try:
            tok.apply_chat_template(_SAMPLE_CONVERSATION, add_generation_prompt=True)
        except ValueError as e:     # a template may refuse a sample (raise_exception): only
            from .chat_template_limits import RenderLimitError      # a budget passed fails
            if isinstance(e.__cause__, RenderLimitError):
                raise ValueError(f"{path}: metadata {Keys.Tokenizer.CHAT_TEMPLATE!r}: {e}") from None
    return "; tokenizer" + (" and chat template load" if template is not None else " loads")


@main.command()
@click.argument("model", required=False, type=ModelPath(path_type=Path, dir_okay=False))
@click.option("--no-tensors", is_flag=True, help="metadata and totals only")
@friendly_errors
def inspect(model, no_tensors):
    """Print a .zmoe's metadata, tensor table and bits per weight (experts and dense).

    MODEL: a .zmoe file (default: the bundled SmolLM2 MoE, built on first use).
    """
    model = default_model_if_none(model)
    from .convert.export import summarize
    click.echo(summarize(model, show_tensors=not no_tensors))
