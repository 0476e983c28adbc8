"""usmlab: run the USM misattribution lab with one command and get a verdict."""

__version__ = "0.1.0"
