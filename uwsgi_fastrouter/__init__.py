"""uwsgi-fastrouter: a pure-Python drop-in replacement for the uWSGI FastRouter."""

__version__ = "0.1.0"

# The uWSGI release whose behaviour (and stats "version" field) this package follows.
UWSGI_COMPAT_VERSION = "2.0.31"

__all__ = ["__version__", "UWSGI_COMPAT_VERSION"]
