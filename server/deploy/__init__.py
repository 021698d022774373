"""A real federation on Flower's deployment engine: the server home, its certificates, the
public gateway, the SuperLink launcher and the device registry (``fedvox-server``)."""
