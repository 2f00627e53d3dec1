"""Ray Serve entrypoints (``serve.app:app_builder``); the logic is in :mod:`pneumonet.scoring.online`."""
