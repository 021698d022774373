"""``fedvox-audit``: privacy-ledger audits (recompute every epsilon, detect tampering, plots)."""
