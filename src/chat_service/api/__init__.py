"""REST routes: thin adapters from HTTP to the domain layer."""
