"""Dense-to-MoE initialisations ("upcycling"): one function per published method."""
