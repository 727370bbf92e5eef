"""Reporting: the report, its plots and the summary table, all read from a run directory.

Above the core: it reads what the core wrote; the core never imports it."""
