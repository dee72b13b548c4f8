"""cnpsfs benchmark harness (run it through ``scripts/bench``).

One command builds the corpus, installs the peers from Debian packages, measures every
section in the same run and writes a markdown table plus raw JSON numbers.
"""
