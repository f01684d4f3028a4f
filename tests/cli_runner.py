"""The in-process command line the CLI tests share."""
from __future__ import annotations

from click.testing import CliRunner

from zipmoe_rt.cli import main


def cli(*args, input=None):
    """Run ``zipmoe-rt ARGS`` in-process (click's CliRunner, ``ZIPMOE_RT_DEBUG`` unset) with
    ``input`` on stdin; return the click Result (stdout and stderr apart). An exception other
    than SystemExit is raised again, so a traceback fails the test."""
    r = CliRunner().invoke(main, [str(a) for a in args], input=input,
                           env={"ZIPMOE_RT_DEBUG": None}, prog_name="zipmoe-rt")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r
