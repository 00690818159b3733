"""What differs per task: its cached outputs, loss, metric and renderer. classify/ and
detect/ over the shared stages (cache, train, export, check)."""
