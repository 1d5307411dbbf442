"""Model components; see flamingo.py for how they compose."""
