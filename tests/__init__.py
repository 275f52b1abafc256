"""The test suite (a package, so that `tests.*` imports resolve here and not to a site-packages `tests` that some
wheels ship, e.g. torch-fidelity)."""
