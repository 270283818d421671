"""Helpers every stage shares: atomic files and JSON (``io``), figures, file-format checks
(``formats``), sage_nn's warnings (``notes``), lazy package exports.
"""

