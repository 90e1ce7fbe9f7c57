"""Bundled demo upstream (pets/users/orders) and its contract, used by `apishield demo`."""
