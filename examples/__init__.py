"""Example gatekeeper plugins, each a module with its tests beside it (see docs/plugins.md)."""
