"""The base class of the project's management commands: every error ends in one line.

Django prints a 10-line usage block for a bad argument and prefixes refusals with the
exception's class name (`CommandError: ...`). Commands that subclass `OneLineErrorCommand`
end both the same way, on stderr, in argparse's own style:

    populate_fake_user_bulk: error: argument count: expected a number greater than 0, got 0 (see `manage.py populate_fake_user_bulk --help`)
    populate_fake_user_bulk: error: The legacy table account_user does not exist: run ...

To use it: `class Command(OneLineErrorCommand)` instead of `BaseCommand`; nothing else changes.

Exit status 2 for a bad command line (argparse's convention), 1 (`CommandError.returncode`)
for a refusal. Called from code (`call_command`), both raise `CommandError` as Django does;
`--traceback` still shows the traceback.
"""

import sys
from functools import partial

from django.core.management.base import BaseCommand, CommandError, SystemCheckError


class OneLineErrorCommand(BaseCommand):
    """A `BaseCommand` whose bad arguments and refusals end in one line, with no class name."""

    @property
    def command_name(self) -> str:
        """The name it is run by (Django finds commands by module name)."""
        return type(self).__module__.rpartition(".")[2]

    # A script under scripts/ that runs this command: its usage line names the script.
    script: str | None = None

    def create_parser(self, prog_name, subcommand, **kwargs):
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        if self.script and prog_name == self.script:
            parser.prog = self.script
        parser.error = partial(self._argument_error, parser)
        return parser

    def _argument_error(self, parser, message):
        if not parser.called_from_command_line:
            raise CommandError(f"Error: {message}")
        sys.stderr.write(f"{self.command_name}: error: {message} (see `{parser.prog} --help`)\n")
        sys.exit(2)

    def execute(self, *args, **options):
        if not getattr(self, "_called_from_command_line", False) or options.get("traceback"):
            return super().execute(*args, **options)
        try:
            return super().execute(*args, **options)
        except SystemCheckError:
            raise  # formats itself
        except CommandError as exc:
            self.stderr.write(f"{self.command_name}: error: {exc}")
            sys.exit(exc.returncode)
