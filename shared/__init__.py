"""fedvox base layer: models, audio, text, privacy and wire formats.

Nothing in here imports from ``client``, ``server`` or ``simulations``.
"""
