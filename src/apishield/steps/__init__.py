"""Pipeline steps, one module each. A step's `build()` returns None when it is off."""
