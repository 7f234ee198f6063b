"""Django's `migrate`, ending its refusals in one line like the project's other commands.

Migration 0002 is the user copy: when it refuses (rejected legacy rows under the default
policy), Django's own `migrate` would print the exception's class name (`CopyError: ...`).
"""

from django.core.management.commands.migrate import Command as MigrateCommand

from account.management.base import OneLineErrorCommand


class Command(OneLineErrorCommand, MigrateCommand):
    help = MigrateCommand.help
