"""The one error the analysis raises: a missing or corrupt input, said in one line (exit 2).

It is usmlab's InputError under the name the analysis modules use, so the readers they share
with the rest of usmlab (usmlab/jsonlines.py, usmlab/manifest.py) raise it too.
"""

from usmlab.errors import InputError

AnalysisError = InputError
