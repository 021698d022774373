"""fedvox device side: hardware probe, resource profiles, private data, DP training, ClientApp."""
