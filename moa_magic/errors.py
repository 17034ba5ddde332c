"""Errors a user can act on. The magic turns every `MoaUserError` into IPython's `UsageError`."""


class MoaError(Exception):
    """Base of every error moa-magic raises on purpose."""


class MoaUserError(MoaError):
    """Bad input or set-up: the message says what was wrong and how to fix it."""


class ConfigError(MoaUserError):
    """A config file or option that cannot be used; names the file and key."""


class MissingKeyError(MoaUserError):
    """A provider's API key env var is not set. The message names the variable, never a value."""

    def __init__(self, provider: str, env_var: str):
        self.provider = provider
        self.env_var = env_var
        super().__init__(
            f"Provider '{provider}' needs an API key in the environment variable {env_var}, which is "
            f"not set. Set it without writing it into your notebook: in a shell, "
            f"`read -s {env_var} && export {env_var}` before starting Jupyter; or in Python, "
            f"`import os, getpass; os.environ['{env_var}'] = getpass.getpass('{env_var}: ')`."
        )


class RunFailed(MoaError):
    """A run ended without a final answer. `.result` keeps every call that did finish."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
