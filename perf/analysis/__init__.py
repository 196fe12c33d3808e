"""Analysis of benchmark records: the α–β model (model) and the report (report)."""
