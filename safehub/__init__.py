"""safehub: torch.hub, with the repository's code run in a locked-down worker."""
