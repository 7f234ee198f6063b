#!/usr/bin/env python
"""Django's command-line utility, with one-line errors for configuration and database problems."""

import sys

from config.cli import main

if __name__ == "__main__":
    main(sys.argv)
