"""The report's parts: quality against the retrainings, the data and privacy audits, figures (no stage of its own)."""
