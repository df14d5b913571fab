"""Building and finding models: the trained built-in pair, random-weight models for tests,
and the text they are trained on. Serving code (`engine/`) only loads what is built here."""
