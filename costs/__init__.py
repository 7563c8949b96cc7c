"""Money spent: the ledger, budgets and their reservations, the savings report."""
