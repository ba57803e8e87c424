"""Exact, cheap evaluators: the shapes detector and suite, the digits judge, Fréchet distance."""
