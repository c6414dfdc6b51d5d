"""Legacy SEV (and SEV-ES) command handlers; importing a module registers its commands."""
