"""ConfigError: the one exception for a user's mistake, shared by every layer above the models.

Entry points (train.py, evaluate.py, ...) print it as one sentence and exit, without a
traceback. It lives here, at the bottom of the layers that raise it, so that the device
backends can refuse what a device cannot do without importing the run's configuration.
"""


class ConfigError(ValueError):
    """A user mistake in the config, on the command line or in an input file (one sentence)."""
