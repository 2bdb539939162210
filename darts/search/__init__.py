"""The search's helpers beside the DARTS core: collapse guards, budgets, and comparing searched cells."""
