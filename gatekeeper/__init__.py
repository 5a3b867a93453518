"""gatekeeper: a lightweight, fast, OpenAI-compatible gateway built from pluggy plugins.

Plugin authors need only this::

    from gatekeeper import hookimpl

    @hookimpl
    def check_request(flow):
        ...

See ``gatekeeper.hookspecs`` for every hook and ``docs/plugins.md`` for the tutorial.
"""

from gatekeeper.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
