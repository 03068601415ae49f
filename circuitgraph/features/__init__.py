"""Feature-level tools: descriptions, interventions and supernodes."""
