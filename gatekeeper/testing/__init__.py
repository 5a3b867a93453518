"""Test helpers for gatekeeper and for plugin authors: the fake OpenAI upstream and pytest fixtures."""
