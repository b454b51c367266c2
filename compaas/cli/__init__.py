"""The team commands of `compaas` (login, models, datasets, jobs, report), built on the SDK."""

from compaas.cli.commands import register
from compaas.cli.output import ExitCode

__all__ = ["ExitCode", "register"]
