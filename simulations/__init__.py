"""fedvox simulations: synthetic speakers, device fleets, simulation runner and reports."""
