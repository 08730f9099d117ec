"""Evaluation harness: perplexity, the command line, report tables and the papermill runner.

Named ``eval`` as the design asks. It shadows nothing in the standard library (the builtin
``eval()`` is a function, not a module); import it as ``import eval.perplexity`` or
``from eval import perplexity``.
"""
