"""The test suite as a package, so `tests.helpers` resolves here and not to a `tests` package some wheel installs
(torch-fidelity 0.4.0 ships one into site-packages)."""
