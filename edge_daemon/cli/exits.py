"""The command line's exit codes, in a module of their own so that every part of the CLI can
use them without importing the package's entry point."""

# 2 is argparse's for a usage error, so an unreachable daemon gets its own.
EXIT_OK = 0
EXIT_ERROR = 1  # the daemon answered `ok: false`, a config is invalid, an update was not accepted
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3  # nothing answered on the socket
