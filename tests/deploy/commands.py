"""The ``pdserve`` command lines inside deployment artefacts, parsed by pdserve's own parser.

A shell string (a Ray YAML command, a container's ``bash -c`` script) is split the way a
POSIX shell splits words; each ``pdserve`` (or ``.../pdserve``) word starts a command that ends
at the next control operator or redirection. The argv is then parsed by
``router.cli.build_parser`` and the engine config is built from it, so a flag the CLI does
not know, or a value the config rejects, fails the test that found it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex

from engine.arg_utils import engine_config_from_args
from router.cli import build_parser
from router.cluster import parse_resources


class CommandLineError(AssertionError):
    """A pdserve command line in an artefact that pdserve's parser rejects."""


def pdserve_argvs(script: str) -> list[list[str]]:
    """Every pdserve command's arguments (without the program name) in ``script``."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    argvs = []
    for i, word in enumerate(words):
        if word == "pdserve" or word.endswith("/pdserve"):
            argv = []
            for arg in words[i + 1 :]:
                if arg and all(c in "();<>|&" for c in arg):
                    break
                argv.append(arg)
            argvs.append(argv)
    return argvs


def parse_pdserve(argv: list[str]) -> argparse.Namespace:
    """Parse like ``pdserve`` does, then build what the command would build from it."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args(argv)
    except SystemExit as error:
        raise CommandLineError(f"pdserve {shlex.join(argv)}: {stderr.getvalue()}") from error
    try:
        if args.command in ("serve", "generate"):
            engine_config_from_args(args)
        if args.command == "serve":
            parse_resources(args.prefill_resources)
            parse_resources(args.decode_resources)
    except ValueError as error:
        raise CommandLineError(f"pdserve {shlex.join(argv)}: {error}") from error
    return args
