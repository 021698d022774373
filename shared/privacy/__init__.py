"""Differential privacy bookkeeping: accountants (``accounting``), the append-only privacy ledger
(``ledger``), per-client budgets (``budget``) and the audit maths (``audit``). See docs/privacy.md."""
