"""The plumbing under the commands and the DARTS core at the top of the repository."""
