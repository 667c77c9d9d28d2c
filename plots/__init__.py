"""Figure scripts of the suite; each reads a results tree through :mod:`lehi.results`."""
