"""Tools around the stages: benchmarks, reports and tables, publishing, the results
summary, bias tuning, storage tables, the CLI reference."""
